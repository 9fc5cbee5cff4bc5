"""Masked patch prediction (MPP), the paper's self-supervised pre-training (Section 4.6 and
Appendix B.1.2): BERT's masked language modelling with patches for words.

Corruption (``draw_corruption``) acts on the patch embeddings, after the patch projection and
before the [class] token and the position embeddings (``VisionTransformer``'s ``patch_hook``),
so a corrupted patch keeps its position; for the hybrid it acts on the 1x1-patch embeddings of
the ResNet feature map. As BERT's ``create_pretraining_data.py``, each image has exactly
``round(rate * N)`` corrupted patches (at least one; the paper: 50%, it also tried 15%) at
uniformly random positions, and each corrupted patch independently is replaced by the
learnable [mask] embedding (80%), replaced by the embedding of another patch of the same image
chosen uniformly among the N - 1 others (10%), or left unchanged (10%). The loss is on every
corrupted patch, the unchanged ones included, and on no other.

Targets are computed from the image region of each token (the pixel patch: ``patch_size``
times the hybrid backbone's reduction):

- ``mean_colour``: the patch's mean colour with 3 bits per channel, one of 8**C classes
  (512 for RGB; 8 for grey images, whose single channel is quantised the same way);
- ``downsized``: the patch average-pooled to 4x4 cells (row-major), each cell's colour in
  3 bits per channel: 16 predictions of 8**C classes (the patch sides must divide by 4);
- ``pixels``: the patch's pixels (row, column, channel order), normalised per patch to zero
  mean and unit variance over all its values (as MAE), regressed with L2.

3-bit quantisation: the model's [-1, 1] scale is cut into 8 equal bins,
``level = clamp(floor((x + 1) * 4), 0, 7)``; on uint8 pixels (``x = (u - 127.5) / 127.5``)
this is exactly the top 3 bits, ``u // 32`` (bin edges at multiples of 31.875, never an
integer below 255). A colour's class is ``sum_c level_c * 8**(C - 1 - c)``, red most
significant. Per-cell losses of ``downsized`` and per-value losses of ``pixels`` are averaged
within a patch, so every target's loss is a mean over corrupted patches.

The official code never released MPP; two choices are ours and follow its conventions: the
[mask] embedding starts at zero (as its [class] token) and the prediction head (a linear layer
on the final tokens, dropped when fine-tuning) starts at zero (as its classification head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.models.vit import VisionTransformer, ViTConfig, to_pair

MPPTarget = Literal["mean_colour", "downsized", "pixels"]
MPP_TARGETS: tuple[str, ...] = ("mean_colour", "downsized", "pixels")
COLOUR_LEVELS = 8  # 3 bits per channel
DOWNSIZED_CELLS = 4  # the downsized patch is 4x4 cells
PIXEL_NORM_EPS = 1e-6

# What happened to each patch (``Corruption.kind``).
CLEAN, MASKED, RANDOM, UNCHANGED = 0, 1, 2, 3


def pixel_patch_size(cfg: ViTConfig) -> tuple[int, int]:
    """The image region of one token: the patch size times the hybrid backbone's reduction."""
    reduction = cfg.backbone_reduction
    return (cfg.patch_size[0] * reduction, cfg.patch_size[1] * reduction)


def _check_grid(images: torch.Tensor, patch: tuple[int, int]) -> None:
    if images.ndim != 4 or images.shape[-2] % patch[0] or images.shape[-1] % patch[1]:
        raise ValueError(
            f"expected images (B, C, H, W) with H and W divisible by the patch size "
            f"{patch[0]}x{patch[1]}, got shape {tuple(images.shape)}"
        )


def colour_levels(x: torch.Tensor) -> torch.Tensor:
    """3-bit level (0..7) of values on the model's [-1, 1] scale (see the module docstring)."""
    return ((x + 1.0) * (COLOUR_LEVELS / 2)).floor().clamp(0, COLOUR_LEVELS - 1).long()


def colour_classes(levels: torch.Tensor) -> torch.Tensor:
    """(..., C) levels -> (...) class indices in [0, 8**C), the first channel most significant."""
    channels = levels.shape[-1]
    powers = COLOUR_LEVELS ** torch.arange(channels - 1, -1, -1, device=levels.device)
    return (levels * powers).sum(dim=-1)


def _pooled_colours(images: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """Mean of each ``cell``-sized block, quantised: (B, C, H / cell_h, W / cell_w) levels."""
    return colour_levels(F.avg_pool2d(images.float(), cell, stride=cell))


def mean_colour_3bit(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(B, N) classes of the patches' mean colours, patches in row-major order."""
    patch = to_pair(patch_size)
    _check_grid(images, patch)
    levels = _pooled_colours(images, patch)  # (B, C, gh, gw)
    return colour_classes(levels.flatten(2).transpose(1, 2))


def downsized_3bit(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(B, N, 16) classes of each patch's 4x4 average-pooled cells (row-major in the patch)."""
    patch = to_pair(patch_size)
    _check_grid(images, patch)
    if patch[0] % DOWNSIZED_CELLS or patch[1] % DOWNSIZED_CELLS:
        raise ValueError(
            f"the 4x4 downsized target needs patch sides divisible by 4, got "
            f"{patch[0]}x{patch[1]}; use the mean_colour or pixels target"
        )
    cell = (patch[0] // DOWNSIZED_CELLS, patch[1] // DOWNSIZED_CELLS)
    levels = _pooled_colours(images, cell)  # (B, C, 4 gh, 4 gw)
    b, c, h, w = levels.shape
    gh, gw, n = h // DOWNSIZED_CELLS, w // DOWNSIZED_CELLS, DOWNSIZED_CELLS
    levels = levels.reshape(b, c, gh, n, gw, n).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, 4, 4, C)
    return colour_classes(levels.reshape(b, gh * gw, n * n, c))


def normalised_pixels(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(B, N, P_h * P_w * C) pixels of each patch, normalised per patch (see the docstring)."""
    patch = to_pair(patch_size)
    _check_grid(images, patch)
    b, c, h, w = images.shape
    gh, gw = h // patch[0], w // patch[1]
    pixels = images.float().reshape(b, c, gh, patch[0], gw, patch[1])
    pixels = pixels.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch[0] * patch[1] * c)
    mean = pixels.mean(dim=-1, keepdim=True)
    var = pixels.var(dim=-1, correction=0, keepdim=True)
    return (pixels - mean) / (var + PIXEL_NORM_EPS).sqrt()


@dataclass
class Corruption:
    """One draw of ``draw_corruption`` for a batch of B images of N patches."""

    kind: torch.Tensor  # (B, N) int64: CLEAN, MASKED, RANDOM or UNCHANGED
    source: torch.Tensor  # (B, N) int64: the patch copied in at RANDOM positions, else itself

    @property
    def corrupted(self) -> torch.Tensor:
        """(B, N) bool: the positions that carry the loss."""
        return self.kind != CLEAN

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, patch index) of every corrupted patch, row-major: integer indices
        work on any device without the host sync a boolean mask costs."""
        image, patch = self.corrupted.nonzero(as_tuple=True)
        return image, patch


def corrupted_count(num_patches: int, rate: float) -> int:
    """Corrupted patches per image: ``rate * N`` rounded half up, at least one."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"the corruption rate must be in (0, 1], got {rate}")
    return max(1, int(rate * num_patches + 0.5))


def draw_corruption(
    batch: int,
    num_patches: int,
    rate: float = 0.5,
    generator: torch.Generator | None = None,
    probabilities: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Corruption:
    """Which patches to corrupt and how (see the module docstring), drawn on ``generator``'s
    device (CPU by default: the draw is tiny and the same on any accelerator)."""
    if num_patches < 2:
        raise ValueError(
            f"masked patch prediction needs at least 2 patches per image, got {num_patches}"
        )
    if len(probabilities) != 3 or min(probabilities) < 0 or abs(sum(probabilities) - 1) > 1e-6:
        raise ValueError(
            f"probabilities are (mask, random other, unchanged) summing to 1, got {probabilities}"
        )
    count = corrupted_count(num_patches, rate)
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand(batch, num_patches, generator=generator, device=device).argsort(dim=1)
    corrupted = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    corrupted.scatter_(1, order[:, :count], True)
    u = torch.rand(batch, num_patches, generator=generator, device=device)
    mask_p, random_p, _ = probabilities
    how = torch.full_like(order, UNCHANGED)
    how[u < mask_p + random_p] = RANDOM
    how[u < mask_p] = MASKED
    kind = torch.where(corrupted, how, CLEAN)
    # Another patch uniformly among the N - 1 others: draw from N - 1, skip over itself.
    own = torch.arange(num_patches, device=device).expand(batch, -1)
    other = torch.randint(num_patches - 1, (batch, num_patches), generator=generator, device=device)
    other = other + (other >= own).long()
    return Corruption(kind, torch.where(kind == RANDOM, other, own))


def apply_corruption(
    tokens: torch.Tensor, mask_token: torch.Tensor, corruption: Corruption
) -> torch.Tensor:
    """Tokens (B, N, D) with [mask] and copied-in embeddings where ``corruption`` says."""
    kind = corruption.kind.to(tokens.device)
    source = corruption.source.to(tokens.device)
    copied = tokens.gather(1, source[..., None].expand_as(tokens))  # itself where not RANDOM
    mask = mask_token.to(tokens.dtype).expand_as(tokens)
    return torch.where((kind == MASKED)[..., None], mask, copied)


def corrupt_patches(
    tokens: torch.Tensor,
    mask_token: torch.Tensor,
    rate: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted tokens (B, N, D), corrupted positions (B, N) bool on the tokens' device)."""
    if tokens.ndim != 3 or mask_token.shape[-1] != tokens.shape[-1]:
        raise ValueError(
            f"expected tokens (B, N, D) and a mask token of size D, got {tuple(tokens.shape)} "
            f"and {tuple(mask_token.shape)}"
        )
    corruption = draw_corruption(tokens.shape[0], tokens.shape[1], rate, generator)
    return apply_corruption(tokens, mask_token, corruption), corruption.corrupted.to(tokens.device)


class MaskedPatchPrediction(nn.Module):
    """A ViT backbone (its classification head unused) plus the [mask] embedding and the
    prediction head; ``forward(images, generator) -> (mean loss, metric sums, count)``.

    Only ``backbone`` is the pre-trained model to save and fine-tune; ``mask_token`` and
    ``head`` exist for pre-training only.
    """

    def __init__(
        self, backbone: VisionTransformer, target: MPPTarget = "mean_colour", rate: float = 0.5
    ) -> None:
        super().__init__()
        if target not in MPP_TARGETS:
            raise ValueError(f"target must be one of {MPP_TARGETS}, not {target!r}")
        corrupted_count(2, rate)  # validates the rate now, not at the first batch
        cfg = backbone.cfg
        self.backbone = backbone
        self.target = target
        self.rate = rate
        self.patch = pixel_patch_size(cfg)
        self.classes = COLOUR_LEVELS**cfg.in_chans
        if target == "downsized" and (
            self.patch[0] % DOWNSIZED_CELLS or self.patch[1] % DOWNSIZED_CELLS
        ):
            raise ValueError(
                f"the downsized target needs pixel patches divisible by 4, this model's are "
                f"{self.patch[0]}x{self.patch[1]}"
            )
        outputs = {
            "mean_colour": self.classes,
            "downsized": DOWNSIZED_CELLS**2 * self.classes,
            "pixels": self.patch[0] * self.patch[1] * cfg.in_chans,
        }[target]
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))
        self.head = nn.Linear(cfg.width, outputs)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Every patch's target: (B, N), (B, N, 16) classes or (B, N, P*P*C) values."""
        if self.target == "mean_colour":
            return mean_colour_3bit(images, self.patch)
        if self.target == "downsized":
            return downsized_3bit(images, self.patch)
        return normalised_pixels(images, self.patch)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Loss (mean over corrupted patches), metric sums over them (``loss``, and
        ``accuracy`` for colour targets: the fraction of a patch's predictions that are
        right) and their count. ``images`` in [-1, 1], as the backbone takes them."""
        drawn: list[Corruption] = []

        def corrupt(tokens: torch.Tensor) -> torch.Tensor:
            drawn.append(draw_corruption(tokens.shape[0], tokens.shape[1], self.rate, generator))
            return apply_corruption(tokens, self.mask_token, drawn[0])

        features = self.backbone.forward_features(images, patch_hook=corrupt)
        image, patch = (i.to(features.device) for i in drawn[0].positions())
        tokens = features[image, patch + self.backbone.num_prefix]  # (M, D)
        outputs = self.head(tokens).float()
        targets = self.targets(images)[image, patch]
        if self.target == "pixels":
            per_patch = (outputs - targets).square().mean(dim=-1)
            metrics = {"loss": per_patch.detach().sum()}
        else:
            logits = outputs.reshape(*targets.shape, self.classes)
            per_prediction = F.cross_entropy(
                logits.reshape(-1, self.classes), targets.reshape(-1), reduction="none"
            ).reshape(targets.shape)
            correct = (logits.argmax(dim=-1) == targets).float()
            if self.target == "downsized":
                per_patch, correct = per_prediction.mean(dim=-1), correct.mean(dim=-1)
            else:
                per_patch = per_prediction
            metrics = {"loss": per_patch.detach().sum(), "accuracy": correct.sum()}
        return per_patch.mean(), metrics, len(per_patch)
