"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), as the official ``models_vit.py``.

Image → P×P patches, linearly projected (for the hybrid: a ResNet feature map cut into
patches) → [class] token prepended → position embedding added → pre-norm encoder →
final LayerNorm → [class] token or average of tokens → optional Dense+tanh representation
layer (pre-training) → linear head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
from torch import nn

from vitkit.models.layers import Attention, AttentionImpl, Block, PatchDropout, lecun_normal_
from vitkit.models.posembed import POS_EMBED_KINDS, Grid, PosEmbedKind, PositionEmbedding
from vitkit.models.pretrained import PretrainedModel
from vitkit.models.registry import Description
from vitkit.models.resnet import BackboneNumerics, ResNetBackbone
from vitkit.utils.config import ConfigMixin

ClassifierKind = Literal["token", "gap"]
GeluKind = Literal["tanh", "none"]


def to_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a (height, width) pair, got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass
class ViTConfig(ConfigMixin):
    """Everything that defines a ViT; saved as ``config.json`` beside the weights."""

    config_name = "ViT config"

    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    eps: float = 1e-6
    gelu: GeluKind = "tanh"  # "none" is the exact erf form (PyTorch's name)
    classifier: ClassifierKind = "token"
    pos_embed: PosEmbedKind = "learned"
    representation_size: int | None = None
    resnet_layers: tuple[int, ...] | None = None  # set for the hybrid
    resnet_width_factor: float = 1.0
    # the hybrid backbone's epsilons: the official code's, or BiT's (Hugging Face's vit-hybrid)
    resnet_numerics: BackboneNumerics = "official"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    # while training, the fraction of each image's patch tokens dropped before the encoder
    patch_dropout: float = 0.0
    attn_impl: AttentionImpl = "auto"
    dynamic_img_size: bool = False  # accept any input size, resizing pos embeddings on the fly
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (class names, ...)

    def __post_init__(self) -> None:
        self.img_size = to_pair(self.img_size)
        self.patch_size = to_pair(self.patch_size)
        if self.resnet_layers is not None:
            self.resnet_layers = tuple(self.resnet_layers)
        problems = []
        if self.classifier not in ("token", "gap"):
            problems.append(f"classifier must be 'token' or 'gap', not {self.classifier!r}")
        if self.pos_embed not in POS_EMBED_KINDS:
            problems.append(f"pos_embed must be one of {POS_EMBED_KINDS}, not {self.pos_embed!r}")
        if self.gelu not in ("tanh", "none"):
            problems.append(f"gelu must be 'tanh' or 'none' (exact), not {self.gelu!r}")
        if self.resnet_numerics not in ("official", "bit"):
            problems.append(
                f"resnet_numerics must be 'official' or 'bit', not {self.resnet_numerics!r}"
            )
        problems += self._nonsense_sizes()
        if self.num_heads >= 1 and self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0 (0 = no head), not {self.num_classes}")
        for name in ("dropout", "attn_dropout", "drop_path", "patch_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.patch_dropout and self.pos_embed == "relative":
            problems.append(
                "patch_dropout drops tokens, which the relative position embedding's bias "
                "between all the patches cannot follow: set patch_dropout to 0 or use another "
                "pos_embed"
            )
        reduction = self.backbone_reduction
        for size, patch, axis in zip(
            self.img_size, self.patch_size, ("height", "width"), strict=True
        ):
            if patch >= 1 and size % (patch * reduction):
                problems.append(
                    f"image {axis} {size} is not divisible by the patch size {patch}"
                    + (f" times the backbone's reduction {reduction}" if reduction > 1 else "")
                )
        if problems:
            raise ValueError("invalid ViT config: " + "; ".join(problems))

    def _nonsense_sizes(self) -> list[str]:
        """Sizes and numerics that would build a broken model (or NaN outputs) rather than
        fail: checked here so that overrides (``vitkit convert --eps``, ``replace``) are
        validated like configs."""
        problems = []
        positive = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "resnet_layers": self.resnet_layers or (),
            "in_chans": (self.in_chans,),
            "width": (self.width,),
            "depth": (self.depth,),
            "num_heads": (self.num_heads,),
            "mlp_dim": (self.mlp_dim,),
            "representation_size": (
                1 if self.representation_size is None else self.representation_size,
            ),
        }
        for name, values in positive.items():
            if any(v < 1 for v in values):
                shown = values if len(values) != 1 else values[0]
                problems.append(f"{name} must be at least 1, not {shown}")
        if not self.eps > 0:  # also catches NaN
            problems.append(f"eps must be > 0, not {self.eps}")
        if not self.resnet_width_factor > 0:
            problems.append(f"resnet_width_factor must be > 0, not {self.resnet_width_factor}")
        return problems

    def description(self) -> Description:
        """This ViT in words (``Architecture.describe``); a subclass extends it with its own
        fields."""
        p, img = self.patch_size, self.img_size
        summary = [
            f"width {self.width}, depth {self.depth}, {self.num_heads} heads, MLP {self.mlp_dim}",
            f"patch {p[0]}x{p[1]}, image {img[0]}x{img[1]}, {self.in_chans} channels",
            f"{self.classifier} classifier, {self.pos_embed} position embedding",
            f"{self.num_classes} classes" if self.num_classes else "no head",
        ]
        if self.representation_size:
            summary.append(f"representation layer {self.representation_size}")
        if self.resnet_layers:
            summary.append(f"hybrid ResNet stages {list(self.resnet_layers)}")
        rows = [
            ("patches", f"{p[0]}x{p[1]}, grid {self.grid[0]}x{self.grid[1]}"),
            ("encoder", f"{self.depth} layers, width {self.width}, {self.num_heads} heads"),
            ("MLP width", str(self.mlp_dim)),
            ("classifier", f"{self.classifier}, position embedding {self.pos_embed}"),
        ]
        if self.resnet_layers is not None:
            rows.insert(1, ("hybrid", f"ResNet stages {list(self.resnet_layers)}"))
        gelu = "tanh approximation" if self.gelu == "tanh" else "exact (erf)"
        return Description(
            summary="; ".join(summary),
            numerics=f"GELU {gelu}, LayerNorm eps {self.eps:g}",
            columns={"width": str(self.width), "depth": str(self.depth), "patch": f"{p[0]}x{p[1]}"},
            rows=rows,
        )

    @property
    def backbone_reduction(self) -> int:
        return 1 if self.resnet_layers is None else 4 * 2 ** (len(self.resnet_layers) - 1)

    @property
    def grid(self) -> Grid:
        r = self.backbone_reduction
        return (
            self.img_size[0] // (self.patch_size[0] * r),
            self.img_size[1] // (self.patch_size[1] * r),
        )


PatchHook = Callable[[torch.Tensor], torch.Tensor]
TokenHook = Callable[[torch.Tensor], torch.Tensor]
"""``VisionTransformer.token_hook(tokens) -> tokens``: sees the encoder's input, (B, N, D) after
the [class] token was prepended, the position embedding added (and its dropout) and, while
training, patch dropout applied, and returns what the encoder blocks get, (B, N', D). It may
drop tokens (MAE-style masking keeps a random subset of the patches) or add some (DeiT's
distillation token); as an ``nn.Module`` its parameters are the model's (saved, loaded,
trained). Only the relative position embedding, which biases attention between the N original
tokens, needs N' == N. Pooling reads the result: the [class] token at index 0, or the mean of
all N' tokens (``gap``)."""


@dataclass
class Intermediates:
    """What ``forward_intermediates`` returns: the features and, on request, per-layer outputs."""

    features: torch.Tensor  # (B, N, D) after the final LayerNorm
    blocks: list[torch.Tensor]  # output of every encoder block, before the final norm
    attentions: list[torch.Tensor]  # (B, heads, N, N) attention probabilities per layer


class Tokenizer(Protocol):
    """What a ViT reads from its patch embedding (``PatchEmbed``, or a variant's own):
    ``tokenizer(images) -> (tokens (B, N, D), grid)``, the hybrid's ResNet or None, the
    projection of patches to tokens, and the pixels per token along each axis."""

    backbone: ResNetBackbone | None
    proj: nn.Conv2d | nn.Linear
    reduction: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]: ...


class PatchEmbed(nn.Module):
    """Patchify + project, as one strided convolution; the hybrid puts a ResNet in front."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.backbone: ResNetBackbone | None = None
        c_in = cfg.in_chans
        if cfg.resnet_layers is not None:
            self.backbone = ResNetBackbone(
                cfg.resnet_layers, cfg.in_chans, cfg.resnet_width_factor, cfg.resnet_numerics
            )
            c_in = self.backbone.out_channels
        self.proj: nn.Conv2d | nn.Linear = nn.Conv2d(
            c_in, cfg.width, cfg.patch_size, stride=cfg.patch_size
        )
        self.reduction: tuple[int, int] = (
            cfg.patch_size[0] * cfg.backbone_reduction,
            cfg.patch_size[1] * cfg.backbone_reduction,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        if self.backbone is not None:
            x = self.backbone(x)
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class VisionTransformer(PretrainedModel):
    """ViT and its ablations; build one from a ``ViTConfig`` or from keyword arguments."""

    cfg: ViTConfig
    config_class: type[ViTConfig] = ViTConfig  # what keyword arguments alone build

    def __init__(self, cfg: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = cfg.replace(**kwargs) if cfg is not None else self.config_class(**kwargs)
        self.cfg = cfg
        self.num_prefix = 1 if cfg.classifier == "token" else 0
        self.patch_embed = self.make_patch_embed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if self.num_prefix else None
        self.pos_embed = PositionEmbedding(
            cfg.pos_embed, cfg.width, cfg.grid, self.num_prefix, cfg.num_heads, cfg.depth
        )
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.patch_drop = PatchDropout(cfg.patch_dropout, self.num_prefix)
        self.token_hook: TokenHook | None = None  # set by a subclass or a plugin (TokenHook)
        # Stochastic depth grows linearly with depth, from 0 to drop_path at the last block.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(
                cfg.width,
                cfg.num_heads,
                cfg.mlp_dim,
                cfg.qkv_bias,
                cfg.eps,
                cfg.gelu,
                cfg.dropout,
                cfg.attn_dropout,
                rate,
                cfg.attn_impl,
                self.attention_class(cfg),
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.pre_logits = None
        if cfg.representation_size:
            self.pre_logits = nn.Linear(cfg.width, cfg.representation_size)
        head_in = cfg.representation_size or cfg.width
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes else None
        self.init_weights()

    def make_patch_embed(self, cfg: ViTConfig) -> Tokenizer:
        """The patch embedding; a variant with another tokenizer returns its own."""
        return PatchEmbed(cfg)

    def attention_class(self, cfg: ViTConfig) -> type[Attention]:
        """The blocks' self-attention: a variant returns its subclass of ``Attention``."""
        return Attention

    # ----------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (see ``models_vit.py``)."""
        if self.patch_embed.backbone is not None:
            self.patch_embed.backbone.init_weights()
        lecun_normal_(self.patch_embed.proj.weight)
        assert self.patch_embed.proj.bias is not None  # built with one
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.pos_embed.init_weights()
        for block in self.blocks:
            cast(Block, block).init_weights()
        if self.pre_logits is not None:
            lecun_normal_(self.pre_logits.weight)
            nn.init.zeros_(self.pre_logits.bias)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ----------------------------------------------------------------------------- forward
    def _embed(
        self, x: torch.Tensor, patch_hook: PatchHook | None = None
    ) -> tuple[torch.Tensor, Grid]:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"expected images of shape (batch, {self.cfg.in_chans}, height, width), "
                f"got {tuple(x.shape)}"
            )
        if not self.cfg.dynamic_img_size and tuple(x.shape[-2:]) != self.cfg.img_size:
            raise ValueError(
                f"this model takes {self.cfg.img_size[0]}x{self.cfg.img_size[1]} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize the input, call model.set_img_size(), "
                "or create the model with dynamic_img_size=True"
            )
        tokens, grid = self.patch_embed(x)
        if patch_hook is not None:
            tokens = patch_hook(tokens)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.patch_drop(self.pos_drop(self.pos_embed(tokens, grid)))
        if self.token_hook is not None:
            tokens = self.token_hook(tokens)
        return tokens, grid

    def forward_intermediates(
        self,
        x: torch.Tensor,
        return_blocks: bool = True,
        return_attention: bool = True,
        patch_hook: PatchHook | None = None,
    ) -> Intermediates:
        """Features plus, on request, every block's output and attention probabilities.

        ``patch_hook(tokens) -> tokens`` sees the patch embeddings (B, N, D) straight after the
        projection, before the [class] token and the position embedding: masked patch
        prediction corrupts them there (``vitkit.models.mpp``). The model's own ``token_hook``
        (``TokenHook``) then sees the tokens after the position embedding.
        """
        x, grid = self._embed(x, patch_hook)
        bias = self.pos_embed.attention_bias(grid)
        if bias is not None and bias.shape[-1] != x.shape[1]:
            raise ValueError(
                f"the token hook changed the number of tokens ({bias.shape[-1]} -> "
                f"{x.shape[1]}), which the relative position embedding cannot follow: keep "
                "the count, or use another pos_embed"
            )
        blocks, attentions = [], []
        for i, block in enumerate(self.blocks):
            x, probs = block(x, None if bias is None else bias[i], return_attention)
            if return_blocks:
                blocks.append(x)
            if probs is not None:
                attentions.append(probs)
        return Intermediates(self.norm(x), blocks, attentions)

    def forward_features(
        self, x: torch.Tensor, patch_hook: PatchHook | None = None
    ) -> torch.Tensor:
        """All tokens after the final LayerNorm, (B, N, D); see ``forward_intermediates``."""
        return self.forward_intermediates(
            x, return_blocks=False, return_attention=False, patch_hook=patch_hook
        ).features

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0] if self.cfg.classifier == "token" else features.mean(dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, apply the representation layer, then the head (unless ``pre_logits``)."""
        x = self.pool(features)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------- fine-tuning hooks
    def units(self) -> list[nn.Module]:
        """The encoder blocks; a hybrid's ResNet backbone as one more (its stages are small
        beside the blocks, and one unit keeps its all-gather to one message)."""
        backbone = self.patch_embed.backbone
        return ([backbone] if backbone is not None else []) + list(self.blocks)

    def reset_classifier(self, num_classes: int, keep_representation: bool = False) -> None:
        """Replace the head by a zero-initialised one (the paper's fine-tuning step).

        The pre-training representation layer is dropped unless ``keep_representation``,
        as the official fine-tuning code does.
        """
        if not keep_representation:
            self.pre_logits = None
        rep = self.pre_logits.out_features if self.pre_logits is not None else None
        self.cfg = self.cfg.replace(num_classes=num_classes, representation_size=rep)
        device = self.norm.weight.device
        self.head = None
        if num_classes:
            self.head = nn.Linear(rep or self.cfg.width, num_classes, device=device)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution; position embeddings are resized on the 2-D grid."""
        cfg = self.cfg.replace(img_size=to_pair(img_size))
        self.pos_embed.resize_(cfg.grid)
        self.cfg = cfg


__all__ = [
    "ClassifierKind",
    "GeluKind",
    "Intermediates",
    "PatchHook",
    "TokenHook",
    "Tokenizer",
    "ViTConfig",
    "VisionTransformer",
]
