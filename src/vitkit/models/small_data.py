"""The ViT for small datasets of Lee, Lee and Song ("Vision Transformer for Small-Size
Datasets", 2021): the paper's ViT with two changes that give a plain ViT some of a
convolution's locality without a convolution.

- Shifted patch tokenization (SPT): each patch is embedded together with the same patch of
  four copies of the image shifted by half a patch diagonally (zero-padded), so a token also
  sees the pixels around its patch; the concatenated patch is layer-normalised, then projected
  linearly.
- Locality self-attention (LSA): a learned temperature per head instead of the fixed
  ``1/sqrt(head_dim)``, and no token attends to itself (the diagonal of the logits is masked),
  which sharpens the attention away from the token's own content.

Everything else (the [class] token, position embeddings, the pre-norm encoder, the head) is
the ViT's, and so are its checkpoints' names for those parts; only vitkit's own format holds
the extra parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.layers import Attention
from vitkit.models.posembed import Grid
from vitkit.models.registry import Description
from vitkit.models.resnet import ResNetBackbone
from vitkit.models.vit import PatchEmbed, Tokenizer, VisionTransformer, ViTConfig


@dataclass
class SmallDataViTConfig(ViTConfig):
    """A ``ViTConfig`` with SPT and LSA, each switchable (the source paper's ablation)."""

    config_name = "small-data ViT config"

    shifted_patches: bool = True  # SPT
    locality_attention: bool = True  # LSA

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.shifted_patches and self.resnet_layers is not None:
            problems.append(
                "shifted_patches tokenizes pixels; a hybrid's patches are ResNet features: "
                "set resnet_layers to None or shifted_patches to false"
            )
        if self.shifted_patches and min(self.patch_size) < 2:
            problems.append(
                f"shifted_patches shifts by half a patch, none for patch_size {self.patch_size}: "
                "use patches of at least 2x2 or set shifted_patches to false"
            )
        if problems:
            raise ValueError("invalid small-data ViT config: " + "; ".join(problems))

    def description(self) -> Description:
        base = super().description()
        parts = [
            name
            for name, on in (
                ("shifted patch tokenization", self.shifted_patches),
                ("locality self-attention", self.locality_attention),
            )
            if on
        ]
        summary = f"{base.summary}; {', '.join(parts) or 'neither SPT nor LSA'}"
        rows = [*base.rows, ("small-data changes", ", ".join(parts) or "none")]
        return Description(summary, base.numerics, base.columns, rows)


class ShiftedPatchEmbed(nn.Module):
    """SPT: the image and its four diagonal half-patch shifts, cut into patches, each patch
    layer-normalised over its ``5 * in_chans * patch_h * patch_w`` values, then projected.

    The copies are, in this order, the image and the images whose pixel (i, j) is the input's
    (i + dy, j + dx) (zero outside it) for (dy, dx) = (-s, -s), (-s, +s), (+s, -s), (+s, +s),
    s being half the patch (rounded down) along each axis. A patch's values are ordered as a
    convolution kernel's: channel (the copies' channels in turn), then row, then column.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.backbone: ResNetBackbone | None = None  # SPT tokenizes pixels (the config checks)
        self.patch_size = cfg.patch_size
        self.shift = (cfg.patch_size[0] // 2, cfg.patch_size[1] // 2)
        patch_dim = 5 * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1]
        self.norm = nn.LayerNorm(patch_dim, eps=cfg.eps)
        self.proj: nn.Conv2d | nn.Linear = nn.Linear(patch_dim, cfg.width)
        self.reduction = cfg.patch_size

    def shifted_copies(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5C, H, W): the image, then its four shifts (class docstring)."""
        sy, sx = self.shift
        height, width = x.shape[-2:]
        padded = F.pad(x, (sx, sx, sy, sy))
        copies = [x]
        for top in (0, 2 * sy):  # rows i - s, then i + s
            for left in (0, 2 * sx):  # columns j - s, then j + s
                copies.append(padded[..., top : top + height, left : left + width])
        return torch.cat(copies, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        ph, pw = self.patch_size
        x = self.shifted_copies(x)
        b, c, height, width = x.shape
        grid = (height // ph, width // pw)
        patches = (
            x.reshape(b, c, grid[0], ph, grid[1], pw)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, grid[0] * grid[1], c * ph * pw)
        )
        return self.proj(self.norm(patches)), grid


class LocalitySelfAttention(Attention):
    """LSA: logits ``t_h * q k^T`` with a learned temperature ``t_h`` per head (initialised to
    ``1/sqrt(head_dim)``, the fixed scale it replaces), and minus infinity on the diagonal, so
    that each token attends to the others only (a lone token keeps itself)."""

    def __init__(self, dim: int, num_heads: int, *args: Any, **kwargs: Any) -> None:
        """``Attention``'s arguments."""
        super().__init__(dim, num_heads, *args, **kwargs)
        self.temperature = nn.Parameter(torch.full((num_heads,), self.head_dim**-0.5))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        # The shared path multiplies the logits by head_dim ** -0.5; the queries carry the rest.
        factor = self.temperature * self.head_dim**0.5
        return q * factor.to(q.dtype)[:, None, None], k, v

    def logit_bias(self, bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
        n = q.shape[-2]
        if n == 1:
            return bias
        diagonal = torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill(
            torch.eye(n, dtype=torch.bool, device=q.device), float("-inf")
        )
        return diagonal if bias is None else bias.to(q.dtype) + diagonal


class SmallDataViT(VisionTransformer):
    """The ViT with SPT and / or LSA (the module docstring)."""

    cfg: SmallDataViTConfig
    config_class = SmallDataViTConfig

    def make_patch_embed(self, cfg: ViTConfig) -> Tokenizer:
        assert isinstance(cfg, SmallDataViTConfig)
        return ShiftedPatchEmbed(cfg) if cfg.shifted_patches else PatchEmbed(cfg)

    def attention_class(self, cfg: ViTConfig) -> type[Attention]:
        assert isinstance(cfg, SmallDataViTConfig)
        return LocalitySelfAttention if cfg.locality_attention else Attention

    @torch.no_grad()
    def init_weights(self) -> None:
        """The ViT's initialisation; SPT's layer norm at identity, LSA's temperatures at
        ``1/sqrt(head_dim)``."""
        super().init_weights()
        if isinstance(self.patch_embed, ShiftedPatchEmbed):
            self.patch_embed.norm.reset_parameters()
        for module in self.modules():
            if isinstance(module, LocalitySelfAttention):
                module.temperature.fill_(module.head_dim**-0.5)


__all__ = [
    "LocalitySelfAttention",
    "ShiftedPatchEmbed",
    "SmallDataViT",
    "SmallDataViTConfig",
]
