"""ResNet building blocks shared by the hybrid ViT's backbone and BiT's ResNet-v2.

Both use weight-standardised convolutions and GroupNorm (32 groups), but their reference
code differs in three numerical details that a faithful port must keep apart:

- padding: the official ViT code (Flax) pads as TensorFlow's 'SAME', which puts the odd extra
  row and column at the bottom and right (PyTorch's symmetric ``padding=`` cannot express it,
  so we pad by hand); BiT pads ``kernel // 2`` on every side (its ``fixed_padding``);
- weight standardisation: the hybrid divides by ``std + 1e-5``, BiT by ``sqrt(var + eps)``;
- GroupNorm eps: 1e-6 in the hybrid, 1e-5 in BiT.

This module also holds the hybrid's backbone itself, as the official ``models_resnet.py``:
post-activation bottleneck units (ResNet v1.5: the stride sits in the 3x3 convolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.layers import lecun_normal_

Padding = Literal["same", "symmetric"]
EpsOn = Literal["std", "var"]


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) as TensorFlow's 'SAME': output size ceil(in / stride)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def standardize_weight(w: torch.Tensor, eps: float, eps_on: EpsOn) -> torch.Tensor:
    """Each output filter to zero mean and unit (biased) variance.

    ``eps_on="std"`` computes ``(w - mean) / (std + eps)`` (the official ViT hybrid),
    ``"var"`` computes ``(w - mean) / sqrt(var + eps)`` (BiT and timm).
    """
    if eps_on == "std":
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / (std + eps)
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (w - mean) / torch.sqrt(var + eps)


class StdConv2d(nn.Conv2d):
    """Bias-free convolution with weight standardisation, padded 'same' or symmetrically."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        *,
        padding: Padding,
        eps: float,
        eps_on: EpsOn,
    ) -> None:
        symmetric = kernel // 2 if padding == "symmetric" else 0
        super().__init__(c_in, c_out, kernel, stride=stride, padding=symmetric, bias=False)
        self.same = padding == "same"
        self.eps, self.eps_on = eps, eps_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = standardize_weight(self.weight, self.eps, self.eps_on)
        if self.same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, same={self.same}, eps={self.eps}, eps_on={self.eps_on}"


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


def bottleneck_plan(layers: tuple[int, ...], width: int) -> list[list[tuple[int, int, int]]]:
    """``(input channels, bottleneck width, stride)`` of every unit, stage by stage.

    Stage s has bottleneck width ``width * 2**s`` and outputs 4x that; its first unit takes
    the previous stage's output (the stem's ``width`` channels for stage 0) and, from stage 1
    on, halves the resolution. Both ResNets here put that stride in the 3x3 convolution.
    """
    plan, c_in = [], width
    for s, units in enumerate(layers):
        mid = width * 2**s
        stage = []
        for u in range(units):
            stage.append((c_in, mid, 2 if s > 0 and u == 0 else 1))
            c_in = 4 * mid
        plan.append(stage)
    return plan


def needs_projection(c_in: int, mid: int, stride: int) -> bool:
    """A unit that changes width or resolution needs a projection shortcut."""
    return c_in != 4 * mid or stride != 1


# ----------------------------------------------------------- the hybrid's backbone (ViT code)
BackboneNumerics = Literal["official", "bit"]


@dataclass(frozen=True)
class HybridNumerics:
    """The epsilons of a hybrid's backbone: ``official`` is the official Flax code's
    (weights divided by ``std + 1e-5``, GroupNorm eps 1e-6), ``bit`` is BiT's as Hugging
    Face's ``vit-hybrid`` computes it (``sqrt(var + 1e-8)``, GroupNorm eps 1e-5)."""

    ws_eps: float
    eps_on: EpsOn
    norm_eps: float

    def conv(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> StdConv2d:
        return StdConv2d(
            c_in, c_out, kernel, stride, padding="same", eps=self.ws_eps, eps_on=self.eps_on
        )

    def norm(self, channels: int) -> nn.GroupNorm:
        return group_norm(channels, self.norm_eps)


HYBRID_NUMERICS = {
    "official": HybridNumerics(1e-5, "std", 1e-6),
    "bit": HybridNumerics(1e-8, "var", 1e-5),
}


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride here) → 1x1 (4x wide), GroupNorm after each, projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int, numerics: HybridNumerics) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1 = numerics.conv(c_in, width, 1)
        self.gn1 = numerics.norm(width)
        self.conv2 = numerics.conv(width, width, 3, stride)
        self.gn2 = numerics.norm(width)
        self.conv3 = numerics.conv(width, c_out, 1)
        self.gn3 = numerics.norm(c_out)
        self.conv_proj: StdConv2d | None = None
        self.gn_proj: nn.GroupNorm | None = None
        if needs_projection(c_in, width, stride):
            self.conv_proj = numerics.conv(c_in, c_out, 1, stride)
            self.gn_proj = numerics.norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.conv_proj is not None and self.gn_proj is not None:  # set together
            residual = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool ('SAME')."""

    def __init__(self, in_chans: int, width: int, numerics: HybridNumerics) -> None:
        super().__init__()
        self.conv = numerics.conv(in_chans, width, 7, 2)
        self.norm = numerics.norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetBackbone(nn.Module):
    """Stem and stages; stage s has width 64·2^s (times ``width_factor``) and stride 2 from s=1."""

    def __init__(
        self,
        layers: tuple[int, ...],
        in_chans: int = 3,
        width_factor: float = 1,
        numerics: BackboneNumerics = "official",
    ) -> None:
        super().__init__()
        width = int(64 * width_factor)
        chosen = HYBRID_NUMERICS[numerics]
        self.stem = ResNetStem(in_chans, width, chosen)
        plan = bottleneck_plan(layers, width)
        self.stages = nn.Sequential(
            *(nn.Sequential(*(Bottleneck(*unit, chosen) for unit in stage)) for stage in plan)
        )
        self.out_channels = 4 * plan[-1][-1][1]
        self.reduction = 4 * 2 ** (len(layers) - 1)

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
        for unit in self.modules():
            if isinstance(unit, Bottleneck):
                nn.init.zeros_(unit.gn3.weight)  # each residual unit starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
