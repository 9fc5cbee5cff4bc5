"""Batched augmentation on the batch's device: uint8 images in, model-scale floats out.

kornia does random-resized crop, flip and the RandAugment operations. Two things are ours:

- RandAugment picks its operations per *image*, as in the paper and the official TF code;
  kornia's ``RandAugment`` picks one set for the whole batch. Each of kornia's one-operation
  policies is applied to the images that drew it (drawn with replacement, as TF and timm).
  Magnitudes use kornia's scale, 0..30 over each operation's range (rotate: ±m degrees,
  translate ±0.1·m/30 of the size; TF's level L is about kornia's 3L), where colour, contrast,
  brightness, sharpness and solarize are mildest at 15 or 30, not at 0, as in TF; the colour
  operation leaves grey images unchanged.
- mixup / cutmix write soft labels directly (one ``lam`` per batch, mixing each image with
  the batch reversed, as timm); kornia's versions return (label, label, lam) triples instead.

kornia draws from torch's global random generator; every draw here happens inside
``torch.random.fork_rng`` reseeded from the transform's own generator, so the same seed gives
the same augmented batches and the training loop's random state is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
from torch import nn

from vitkit.data.images import check_batch, match_channels, preprocess, resize, to_model_input
from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.utils.config import ConfigMixin


def _augmentation(default: object, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class AugmentConfig(ConfigMixin):
    """Training augmentations; all off by default (a training run's own default, the
    ``[augment]`` of ``TrainConfig``, turns a mild crop on)."""

    random_resized_crop: bool = _augmentation(
        False, "random-resized (Inception) crop instead of a plain resize"
    )
    crop_scale: tuple[float, float] = _augmentation(
        (0.08, 1.0), "MIN MAX area fraction of the random-resized crop"
    )
    crop_ratio: tuple[float, float] = _augmentation(
        (3 / 4, 4 / 3), "MIN MAX aspect ratio (width / height) of the random-resized crop"
    )
    hflip: bool = _augmentation(False, "random horizontal flips")
    alternate_flips: bool = _augmentation(
        False,
        "with hflip: each image mirrored in every other epoch instead of at random (airbench's "
        "alternating flip: a fair coin per image picks the first), so it is seen both ways in "
        "every two epochs",
    )
    translate: int = _augmentation(
        0,
        "random translation by up to this many pixels each way, after the crop (reflect-pad, "
        "then crop back: CIFAR's classic pad-and-crop); 0 = off",
    )
    randaugment: tuple[int, int] | None = _augmentation(
        None, "RandAugment NUM_OPS MAGNITUDE (magnitude on kornia's 0..30 scale)"
    )
    mixup: float = _augmentation(0.0, "mixup's Beta alpha (0 = off)")
    cutmix: float = _augmentation(0.0, "cutmix's Beta alpha (0 = off)")
    label_smoothing: float = _augmentation(0.0, "label smoothing of the targets")

    config_name: ClassVar[str] = "augment"
    check_types: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        self.crop_ratio = (float(self.crop_ratio[0]), float(self.crop_ratio[1]))
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.randaugment is not None:
            num_ops, magnitude = self.randaugment
            if num_ops < 1 or not 0 < magnitude < 30:
                raise ValueError(
                    "randaugment is (num_ops >= 1, magnitude in (0, 30) on kornia's scale), "
                    f"got {self.randaugment}"
                )
            self.randaugment = (int(num_ops), int(magnitude))
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} is a Beta alpha >= 0 (0 = off), got {getattr(self, name)}"
                )
        if self.alternate_flips and not self.hflip:
            raise ValueError("alternate_flips chooses which images hflip mirrors: set hflip too")
        if self.translate < 0:
            raise ValueError(
                f"translate is a number of pixels >= 0 (0 = off), got {self.translate}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


class PerImageRandAugment(nn.Module):
    """RandAugment with operations drawn per image (see the module docstring)."""

    def __init__(self, num_ops: int, magnitude: int) -> None:
        super().__init__()
        self.num_ops = num_ops
        self.names = [policy[0][0] for policy in default_policy]
        self.operations = nn.ModuleList(RandAugment(1, magnitude, [p]) for p in default_policy)

    def forward(self, images: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        """Float images in [0, 1]; on grey images the colour operation leaves them unchanged.
        ``share``: the fraction of the images transformed, the others drawn to skip (progressive
        resizing's adaptive regularization lowers it on small images); at 1 nothing is drawn."""
        grey = images.shape[1] == 1
        skipped = torch.rand(len(images)) >= share if share < 1 else None
        for _ in range(self.num_ops):
            choice = torch.randint(len(self.operations), (len(images),))
            if skipped is not None:
                choice[skipped] = -1
            choice = choice.to(images.device)
            images = images.clone()
            for index, (name, operation) in enumerate(
                zip(self.names, self.operations, strict=True)
            ):
                chosen = torch.nonzero(choice == index).flatten()
                if len(chosen) and not (grey and name == "color"):
                    images[chosen] = operation(images[chosen])
        return images


class BatchTransform(nn.Module):
    """``forward(uint8 images (B, C, H, W), labels (B,), train, cropped)`` -> (float images (B,
    channels, *img_size) in [-1, 1], soft targets (B, num_classes)).

    Training: random-resized crop (else a resize) to ``img_size``, translation, flip,
    RandAugment, then mixup / cutmix with label smoothing, as ``augment`` enables them;
    ``cropped`` images (a streamed source crops each one from its original, ``Batch.cropped``)
    skip the crop, not the rest. Evaluation (``train=False``): ``preprocess`` by the evaluation
    ``preprocessing`` (default: squash to ``img_size``; ``cropped`` images already have its
    geometry), one-hot targets. ``channels`` (default: the input's) converts grey to RGB or RGB
    to grey, for a model with another ``in_chans``. ``train_size`` (default ``img_size``)
    shrinks the augmented training images, for progressive resizing, and ``set_regularization``
    weakens the augmentations there. The random state (``state_dict`` saves it) advances once
    per training batch; ``seed`` also picks the images that alternating flips mirror first.
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        num_classes: int,
        augment: AugmentConfig,
        seed: int,
        *,
        channels: int | None = None,
        preprocessing: EvalPreprocessing | None = None,
    ) -> None:
        super().__init__()
        self.preprocessing = preprocessing or EvalPreprocessing()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.num_classes = num_classes
        self.augment = augment
        self.channels = channels
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.crop = (
            K.RandomResizedCrop(self.img_size, scale=augment.crop_scale, ratio=augment.crop_ratio)
            if augment.random_resized_crop
            else None
        )
        self.translate = (
            K.RandomCrop(self.img_size, padding=augment.translate, padding_mode="reflect")
            if augment.translate
            else None
        )
        self.flip = K.RandomHorizontalFlip() if augment.hflip else None
        self.randaugment = (
            PerImageRandAugment(*augment.randaugment) if augment.randaugment is not None else None
        )
        # Progressive resizing: training batches at this size, augmented at img_size first.
        self.train_size = self.img_size
        self.regularization = 1.0

    def set_regularization(self, strength: float) -> None:
        """Weaken the augmentations to ``strength`` (in [0, 1]) of their configured strength,
        for progressive resizing's adaptive regularization (``schedule.resize_regularization``):
        RandAugment transforms that share of the images, mixup's and cutmix's alphas are scaled
        by it. RandAugment's magnitude is left alone: a lower one is not milder for every
        operation (the module docstring says which)."""
        self.regularization = strength

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """Smoothed one-hot targets: ``1 - s + s/K`` on the label, ``s/K`` elsewhere."""
        smoothing = self.augment.label_smoothing
        targets = F.one_hot(labels, self.num_classes).float()
        return targets * (1.0 - smoothing) + smoothing / self.num_classes

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        train: bool,
        cropped: bool = False,
        *,
        image_ids: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_ids`` and ``epoch``: the training images' numbers, the same in every epoch,
        and the epoch (``Batch.image_ids``, ``Batch.epoch``), which alternating flips need."""
        check_batch(images)
        labels = labels.long().to(images.device)
        if not train:
            targets = F.one_hot(labels, self.num_classes).float()
            inputs = preprocess(
                images, self.img_size, self.channels, self.preprocessing, prepared=cropped
            )
            return inputs, targets
        images = match_channels(images.float(), self.channels)
        mirrored = None
        if self.augment.alternate_flips:
            if image_ids is None:
                raise ValueError(
                    "alternate_flips needs a number per training image that stays the same "
                    "from epoch to epoch (Batch.image_ids), which this data source does not "
                    "give: set alternate_flips = false to mirror at random"
                )
            mirrored = alternating_flips(image_ids, epoch, self.seed).to(images.device)
        seed = int(torch.randint(2**62, (), generator=self.generator))
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)
            # kornia works in [0, 1]
            unit_images, targets = self._augment(images / 255.0, labels, cropped, mirrored)
        return to_model_input(unit_images.clamp(0.0, 1.0) * 255.0), targets

    def _augment(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        cropped: bool,
        mirrored: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        crop = self.crop if self.crop is not None and not cropped else None
        images = crop(images) if crop is not None else resize(images, self.img_size)
        if self.translate is not None:
            images = self.translate(images)
        if mirrored is not None:
            images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        elif self.flip is not None:
            images = self.flip(images)
        if self.randaugment is not None:
            images = self.randaugment(images, self.regularization)
        images = resize(images, self.train_size)
        targets = self.one_hot(labels)
        mixup, cutmix = (self.regularization * a for a in (self.augment.mixup, self.augment.cutmix))
        if mixup > 0 or cutmix > 0:
            use_cutmix = cutmix > 0 and (mixup == 0 or bool(torch.rand(()) < 0.5))
            alpha = cutmix if use_cutmix else mixup
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
            if use_cutmix:
                images, lam = _cutmix(images, lam)
            else:
                images = lam * images + (1.0 - lam) * images.flip(0)
            targets = lam * targets + (1.0 - lam) * targets.flip(0)
        return images, targets


def alternating_flips(image_ids: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Which of the images ``image_ids`` (numbers below 2**32) to mirror in ``epoch`` (bool):
    a fair coin per (image, seed) in even epochs, the opposite in odd ones. The coin is the
    low bit of a 32-bit integer hash (xorshift-multiply, the multiplier under 2**27 so int64
    never overflows), so it needs neither the split's size nor a stored table, and a resumed
    or distributed run draws the same."""
    mask = 0xFFFFFFFF
    x = (image_ids.long() ^ (seed * 0x9E3779B1 & mask)) & mask
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    coin = ((x ^ (x >> 16)) & 1).bool()
    return coin ^ bool(epoch % 2)


def _cutmix(images: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Paste a box of about ``1 - lam`` of the area from the reversed batch; returns the
    images and ``lam`` corrected to the box actually pasted (it is clipped at the border)."""
    height, width = images.shape[-2:]
    cut = (1.0 - lam) ** 0.5
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    top, bottom = max(cy - half_h, 0), min(cy + half_h, height)
    left, right = max(cx - half_w, 0), min(cx + half_w, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
