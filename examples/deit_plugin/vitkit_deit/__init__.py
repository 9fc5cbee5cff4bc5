"""A DeiT-style ViT as a vitkit plugin: one module, registered through the entry point group
``vitkit.plugins`` (see ``pyproject.toml``), written against vitkit's public model API.

DeiT (Touvron et al. 2021) adds a *distillation token* to ViT: a learned token beside the
[class] token, trained to match a teacher's prediction, with a head of its own; at inference
the two heads' logits are averaged. Here the token is added by the model's token hook
(``VisionTransformer.token_hook``), after the [class] token was prepended and the position
embedding added; its own position embedding is folded into the learned token. Checkpoints
record the architecture ``"deit"`` and the config's extra field ``distilled``, so they load
back as this model wherever the plugin is installed. timm's DeiT weights
(``deit_tiny_distilled_patch16_224`` and relatives) are not converted: their names only
served for the registered size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitkit.models import (
    Architecture,
    Description,
    VisionTransformer,
    ViTConfig,
    register,
    register_architecture,
)


@dataclass
class DeiTConfig(ViTConfig):
    """A ViT config plus ``distilled``: whether the model has the distillation token."""

    config_name = "DeiT config"

    distilled: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distilled and self.classifier != "token":
            raise ValueError("a distilled DeiT reads its [class] token: use classifier 'token'")
        if self.distilled and self.pos_embed == "relative":
            raise ValueError(
                "the distillation token has no place in the relative position embedding: "
                "use pos_embed 'learned' or 'sincos2d'"
            )

    def description(self) -> Description:
        described = super().description()
        if not self.distilled:
            return described
        return dataclasses.replace(described, summary=described.summary + "; distillation token")


class DistillationToken(nn.Module):
    """The token hook: insert the learned distillation token right after the [class] token."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.token, std=0.02)  # as DeiT initialises its tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        token = self.token.expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens[:, :1], token, tokens[:, 1:]], dim=1)


class DeiT(VisionTransformer):
    """ViT with a distillation token and head; logits are the mean of the two heads'."""

    cfg: DeiTConfig

    def __init__(self, cfg: DeiTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(cfg.replace(**kwargs) if cfg is not None else DeiTConfig(**kwargs))
        self.head_dist: nn.Linear | None = None
        if self.cfg.distilled:
            self.token_hook = DistillationToken(self.cfg.width)
            self.num_prefix = 2  # [class] and distillation tokens before the patches
            self._reset_distillation_head()

    def _reset_distillation_head(self) -> None:
        self.head_dist = None
        if self.cfg.distilled and self.head is not None:
            self.head_dist = nn.Linear(self.head.in_features, self.cfg.num_classes)
            self.head_dist.to(self.head.weight.device)
            nn.init.zeros_(self.head_dist.weight)
            nn.init.zeros_(self.head_dist.bias)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        logits = super().forward_head(features, pre_logits)
        if pre_logits or self.head_dist is None:
            return logits
        return (logits + self.head_dist(features[:, 1])) / 2

    def reset_classifier(self, num_classes: int, keep_representation: bool = False) -> None:
        super().reset_classifier(num_classes, keep_representation)
        self._reset_distillation_head()


register_architecture(Architecture("deit", DeiTConfig, DeiT))
# timm's naming: deit_<size>[_distilled]_patch<P>_<resolution>; DeiT-Ti is ViT-Ti's size.
register(
    "deit_tiny_distilled_patch16_224",
    architecture="deit",
    patch_size=16,
    width=192,
    depth=12,
    num_heads=3,
    mlp_dim=768,
)
register(
    "deit_tiny_digits",
    architecture="deit",
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    width=64,
    depth=2,
    num_heads=4,
    mlp_dim=128,
)

__all__ = ["DeiT", "DeiTConfig", "DistillationToken"]
