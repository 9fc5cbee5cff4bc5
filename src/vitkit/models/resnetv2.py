"""BiT's ResNet-v2 (Kolesnikov et al., "Big Transfer", ECCV 2020): the paper's CNN baseline.

A pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks") with
GroupNorm (32 groups) and weight-standardised convolutions, as google-research/big_transfer's
``bit_pytorch/models.py`` and timm's ``resnetv2_*_bit``:

- stem: 7x7/2 convolution (64·wf channels), then a zero padding of 1 and a 3x3/2 max pool. No
  norm or activation in the stem: the first unit's pre-activation follows. The zero padding
  is BiT's (its PyTorch code notes that ``MaxPool2d(padding=1)`` is "subtly not the same": the
  stem's output can be negative, so a zero border can win the max);
- bottleneck units: GroupNorm+ReLU → 1x1 conv → GroupNorm+ReLU → 3x3 conv (the stage's stride
  sits here, as in BiT; the original ResNet-v2 put it in the first 1x1) → GroupNorm+ReLU → 1x1
  conv (4x wide), plus the shortcut: the identity, or a strided 1x1 projection of the
  *pre-activated* input when the unit changes width or resolution;
- convolutions pad ``kernel // 2`` on every side (BiT's ``fixed_padding``, not TF's 'SAME');
- after the last stage a GroupNorm+ReLU, global average pooling and a zero-initialised head.

Numerics, as fields of ``ResNetV2Config`` so each checkpoint format can state its own:
weight standardisation divides by ``sqrt(var + ws_eps)``: timm uses ``ws_eps=1e-8`` (the
default here, so timm's weights give timm's outputs), BiT's own code 1e-10 (the ``.npz`` reader
sets it). GroupNorm eps is 1e-5 in both.

The head is an ``nn.Linear`` on the pooled features, like the ViT's, so fine-tuning, probing and
analysis code treat both architectures alike. timm (``head.fc``) and BiT (``head/conv2d``) store
it as a 1x1 convolution on the pooled map, which is the same product: the checkpoint readers
reshape it exactly.

``RESNETV2_MODELS`` names the paper's BiT models (224 px, 1,000 classes; the parameter counts
are timm's) and two small ones for the CPU experiments, sized against the small ViTs (FLOPs
of one forward pass, 2 per multiply-add, as ``FlopCounterMode`` counts them):

- ``resnetv2_cifar``: 32 px CIFAR images, a 3x3/1 stem of 32 channels and three stages of two
  units (bottleneck widths 32, 64, 128: a ResNet-20 in depth), an 8x8 final map like
  ``vit_cifar``'s 64 tokens. 0.87M parameters, 0.27 GFLOPs (``vit_cifar``: 1.8M, 0.25;
  ``vit_cifar_hybrid``: 2.0M, 0.28).
- ``resnetv2_digits``: the 8x8 one-channel digits, two stages of one unit. 117k parameters,
  6.2 MFLOPs (``vit_digits``: 136k, 4.8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.layers import lecun_normal_
from vitkit.models.pretrained import PretrainedModel
from vitkit.models.resnet import StdConv2d, bottleneck_plan, group_norm, needs_projection
from vitkit.models.vit import to_pair
from vitkit.utils.config import ConfigMixin

Stem = Literal["bit", "conv3x3"]
STEMS: tuple[str, ...] = ("bit", "conv3x3")


@dataclass
class ResNetV2Config(ConfigMixin):
    """Everything that defines a BiT ResNet-v2; saved as ``config.json`` beside the weights.

    ``layers`` counts the bottleneck units per stage (ResNet-50: 3, 4, 6, 3); the stem has
    ``64 * width_factor`` channels, stage s a bottleneck width ``64 * width_factor * 2**s``.
    ``stem="conv3x3"`` replaces the 7x7/2 convolution and max pool by one 3x3/1 convolution,
    for small images (CIFAR-style: no early downsampling of 32x32 inputs). ResNets take any
    input size; ``img_size`` is the size the model is trained and evaluated at.
    """

    config_name = "ResNet-v2 config"

    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width_factor: float = 1
    stem: Stem = "bit"
    ws_eps: float = 1e-8
    norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (class names, ...)

    def __post_init__(self) -> None:
        self.img_size = to_pair(self.img_size)
        self.layers = tuple(self.layers)
        problems = []
        if not self.layers or any(int(n) != n or n < 1 for n in self.layers):
            problems.append(
                f"layers must be a non-empty list of unit counts >= 1, not {self.layers}"
            )
        base = 64 * self.width_factor
        if base <= 0 or base % 32:
            problems.append(
                f"width_factor {self.width_factor} gives a stem of {base} channels: GroupNorm's "
                "32 groups need a positive multiple of 32 (width_factor 0.5, 1, 1.5, 2, ...)"
            )
        if self.stem not in STEMS:
            problems.append(f"stem must be one of {STEMS}, not {self.stem!r}")
        if self.in_chans < 1:
            problems.append(f"in_chans must be >= 1, not {self.in_chans}")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0 (0 = no head), not {self.num_classes}")
        if min(self.img_size) < 1:
            problems.append(f"img_size must be positive, not {self.img_size}")
        for name in ("ws_eps", "norm_eps"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, not {getattr(self, name)}")
        if problems:
            raise ValueError("invalid ResNet-v2 config: " + "; ".join(problems))

    @property
    def width(self) -> int:
        """Channels of the stem, and bottleneck width of the first stage."""
        return int(64 * self.width_factor)

    @property
    def num_features(self) -> int:
        """Channels of the final feature map (what the head sees)."""
        return 4 * self.width * 2 ** (len(self.layers) - 1)

    @property
    def reduction(self) -> int:
        """How much smaller the final feature map is than the image, per side."""
        return (4 if self.stem == "bit" else 1) * 2 ** (len(self.layers) - 1)


class PreActBottleneck(nn.Module):
    """norm1+ReLU → conv1 1x1 → norm2+ReLU → conv2 3x3 (stride) → norm3+ReLU → conv3 1x1 (4x)."""

    def __init__(self, c_in: int, mid: int, stride: int, cfg: ResNetV2Config) -> None:
        super().__init__()
        conv = partial(StdConv2d, padding="symmetric", eps=cfg.ws_eps, eps_on="var")
        self.norm1 = group_norm(c_in, cfg.norm_eps)
        self.conv1 = conv(c_in, mid, 1)
        self.norm2 = group_norm(mid, cfg.norm_eps)
        self.conv2 = conv(mid, mid, 3, stride)
        self.norm3 = group_norm(mid, cfg.norm_eps)
        self.conv3 = conv(mid, 4 * mid, 1)
        self.downsample = None
        if needs_projection(c_in, mid, stride):
            self.downsample = conv(c_in, 4 * mid, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        y = self.conv1(x_preact)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return y + shortcut


class ResNetV2Stage(nn.Module):
    """One resolution's units; ``blocks`` keeps timm's parameter names (``stages.N.blocks.M``)."""

    def __init__(self, units: list[tuple[int, int, int]], cfg: ResNetV2Config) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(PreActBottleneck(*unit, cfg) for unit in units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2Stem(nn.Module):
    """BiT: 7x7/2 conv, zero pad 1, 3x3/2 max pool (4x smaller). ``conv3x3``: one 3x3/1 conv."""

    def __init__(self, cfg: ResNetV2Config) -> None:
        super().__init__()
        kernel, stride = (7, 2) if cfg.stem == "bit" else (3, 1)
        self.conv = StdConv2d(
            cfg.in_chans,
            cfg.width,
            kernel,
            stride,
            padding="symmetric",
            eps=cfg.ws_eps,
            eps_on="var",
        )
        self.pool = cfg.stem == "bit"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2) if self.pool else x


class ResNetV2(PretrainedModel):
    """BiT ResNet-v2; build one from a ``ResNetV2Config`` or from keyword arguments."""

    cfg: ResNetV2Config

    def __init__(self, cfg: ResNetV2Config | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = cfg.replace(**kwargs) if cfg is not None else ResNetV2Config(**kwargs)
        self.cfg = cfg
        self.stem = ResNetV2Stem(cfg)
        self.stages = nn.Sequential(
            *(ResNetV2Stage(units, cfg) for units in bottleneck_plan(cfg.layers, cfg.width))
        )
        self.norm = group_norm(cfg.num_features, cfg.norm_eps)
        self.head = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Flax's default (LeCun normal) convolutions, as BiT's JAX code; a zero head.

        No residual branch is zero-initialised: the weight standardisation of an all-zero
        kernel has an infinite gradient, and a zero GroupNorm scale before the ReLU passes none.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map after the last GroupNorm+ReLU, (B, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"expected images of shape (batch, {self.cfg.in_chans}, height, width), "
                f"got {tuple(x.shape)}"
            )
        return F.relu(self.norm(self.stages(self.stem(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the head (unless ``pre_logits`` or there is none)."""
        x = features.mean(dim=(2, 3))
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def units(self) -> list[nn.Module]:
        """The stages (one per resolution)."""
        return list(self.stages)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a zero-initialised one (BiT's fine-tuning step); 0 removes it."""
        self.cfg = self.cfg.replace(num_classes=num_classes)
        self.head = None
        if num_classes:
            device = self.norm.weight.device
            self.head = nn.Linear(self.cfg.num_features, num_classes, device=device)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Record a new input resolution: a convolutional network takes any size as it is."""
        self.cfg = self.cfg.replace(img_size=to_pair(img_size))


RESNETV2_MODELS: dict[str, dict[str, Any]] = {
    f"resnetv2_{depth}x{wf}": dict(layers=layers, width_factor=wf)
    for depth, layers, wf in (
        (50, (3, 4, 6, 3), 1),
        (101, (3, 4, 23, 3), 1),
        (50, (3, 4, 6, 3), 3),
        (101, (3, 4, 23, 3), 3),
        (152, (3, 8, 36, 3), 2),
        (152, (3, 8, 36, 3), 4),
    )
}
RESNETV2_MODELS.update(
    resnetv2_cifar=dict(
        img_size=32, num_classes=10, layers=(2, 2, 2), width_factor=0.5, stem="conv3x3"
    ),
    resnetv2_digits=dict(
        img_size=8, in_chans=1, num_classes=10, layers=(1, 1), width_factor=0.5, stem="conv3x3"
    ),
)

__all__ = ["RESNETV2_MODELS", "ResNetV2", "ResNetV2Config"]
