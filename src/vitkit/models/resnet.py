"""The ResNet backbone of the hybrid ViT, as the official ``models_resnet.py``.

Bottleneck units with weight-standardised convolutions and GroupNorm (32 groups), and
TensorFlow's 'SAME' padding, which puts the odd extra row and column of padding at the
bottom and right: PyTorch's symmetric ``padding=`` cannot express that, so we pad by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.layers import lecun_normal_


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) as TensorFlow's 'SAME': output size ceil(in / stride)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """Conv with weight standardisation ``(w - mean) / (std + 1e-5)`` and 'SAME' padding."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / (std + 1e-5)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride here) → 1x1 (4x wide), GroupNorm after each, projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1, self.gn1 = StdConv2dSame(c_in, width, 1), group_norm(width)
        self.conv2, self.gn2 = StdConv2dSame(width, width, 3, stride), group_norm(width)
        self.conv3, self.gn3 = StdConv2dSame(width, c_out, 1), group_norm(c_out)
        self.conv_proj = self.gn_proj = None
        if c_in != c_out or stride != 1:
            self.conv_proj = StdConv2dSame(c_in, c_out, 1, stride)
            self.gn_proj = group_norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool ('SAME')."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, width, 7, 2)
        self.norm = group_norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetBackbone(nn.Module):
    """Stem and stages; stage s has width 64·2^s (times ``width_factor``) and stride 2 from s=1."""

    def __init__(self, layers: tuple[int, ...], in_chans: int = 3, width_factor: float = 1) -> None:
        super().__init__()
        width = int(64 * width_factor)
        self.stem = ResNetStem(in_chans, width)
        stages, c_in = [], width
        for s, units in enumerate(layers):
            stage_width = width * 2**s
            stride = 1 if s == 0 else 2
            blocks = []
            for u in range(units):
                blocks.append(Bottleneck(c_in, stage_width, stride if u == 0 else 1))
                c_in = 4 * stage_width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_channels = c_in
        self.reduction = 4 * 2 ** (len(layers) - 1)

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
        for stage in self.stages:
            for unit in stage:
                nn.init.zeros_(unit.gn3.weight)  # each residual unit starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
