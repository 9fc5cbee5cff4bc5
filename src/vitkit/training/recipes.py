"""BiT-HyperRule: the fine-tuning recipe of Big Transfer (Kolesnikov et al., 2020, section
3.3), for ResNets and ViTs alike (``vitkit finetune --recipe bit``).

BiT fine-tunes every model on every dataset with one rule instead of a search, so that a
transfer comparison measures the models, not the tuning. The fixed part (the preset
``presets/bit.toml``): SGD with momentum 0.9, no weight decay, no gradient clipping, batch
512, learning rate 0.003, zero-initialised head (``reset_classifier``, as every fine-tuning
here). The part that depends on the data (``bit_hyperrule``, applied by ``bit_config`` when
the preset is resolved), as in google-research/big_transfer's ``bit_hyperrule.py``:

    training images      warm-up   lr / 10 at steps         end     mixup alpha
    < 20,000             100       200, 300, 400            500     0 (off)
    < 500,000            500       3,000, 6,000, 9,000      10,000  0.1
    otherwise            500       6,000, 12,000, 18,000    20,000  0.1

and the resolution by image area: below 96x96 pixels, resize to 160 and take random 128 crops;
otherwise resize to 512 and crop 480 (evaluation: a plain resize to the crop size).

Two adaptations, both logged when a run starts:

- The learning rate scales linearly with the batch, ``0.003 x batch / 512`` (the linear
  scaling rule), so a CPU-sized batch keeps BiT's step size per image; the step counts stay
  BiT's, so a smaller batch sees fewer images. An explicit ``steps`` scales the warm-up and
  the drops with it (the recipe's shape at another length).
- The input resolution stays the model's (or ``img_size``): 128 or 480 pixels are far beyond
  what a small CPU model on 32x32 images can afford. What the rule keeps is its crop: a random
  crop of ``(crop / resize)^2`` of the image area (0.64 for small images, 0.88 for large),
  resized to the input size, with flips; ``--img-size 128`` on 32x32 data follows BiT exactly
  (up to kornia's aspect-ratio jitter of the crop, 3/4 to 4/3).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from vitkit.data.sources import open_splits
from vitkit.training.config import PRESET_RESOLVERS, TrainConfig

logger = logging.getLogger(__name__)

BIT_BATCH = 512
BIT_LR = 0.003
SMALL_DATASET = 20_000
MEDIUM_DATASET = 500_000
SMALL_IMAGE_AREA = 96 * 96


@dataclass(frozen=True)
class HyperRule:
    """BiT-HyperRule's data-dependent settings (steps at batch 512)."""

    warmup_steps: int
    lr_drops: tuple[int, ...]
    steps: int
    mixup: float
    resize: int
    crop: int

    @property
    def crop_area(self) -> float:
        """The random crop's share of the resized image's area."""
        return (self.crop / self.resize) ** 2


def bit_hyperrule(num_examples: int, image_size: tuple[int, int]) -> HyperRule:
    """The rule for ``num_examples`` training images of ``image_size`` (height, width)."""
    if num_examples < 1:
        raise ValueError(f"BiT-HyperRule needs training images, got {num_examples}")
    if num_examples < SMALL_DATASET:
        warmup, drops, steps = 100, (200, 300, 400), 500
    elif num_examples < MEDIUM_DATASET:
        warmup, drops, steps = 500, (3_000, 6_000, 9_000), 10_000
    else:
        warmup, drops, steps = 500, (6_000, 12_000, 18_000), 20_000
    mixup = 0.0 if num_examples < SMALL_DATASET else 0.1
    small = image_size[0] * image_size[1] < SMALL_IMAGE_AREA
    resize, crop = (160, 128) if small else (512, 480)
    return HyperRule(warmup, drops, steps, mixup, resize, crop)


def bit_config(cfg: TrainConfig, keep: Collection[str] = ()) -> TrainConfig:
    """``cfg`` with BiT-HyperRule's data-dependent settings for its training images (after
    ``train_fraction`` and ``val_fraction``) and the learning rate scaled to its batch.

    Settings named in ``keep`` (given explicitly, by flag name with underscores: ``steps``,
    ``mixup``) are left as they are; an explicit ``steps`` rescales the warm-up and the drops
    to it."""
    data = cfg.data
    train = open_splits(
        data.source,
        data.val_fraction,
        cfg.run.seed,
        cfg.data_options,
        train_fraction=data.train_fraction,
    ).train
    image_size = tuple(next(train.eval_batches(1)).images.shape[-2:])
    rule = bit_hyperrule(len(train), (int(image_size[0]), int(image_size[1])))
    steps = cfg.schedule.steps if "steps" in keep and cfg.schedule.steps else rule.steps
    scale = steps / rule.steps
    drops = sorted({round(d * scale) for d in rule.lr_drops} - {0})
    schedule: dict[str, Any] = dict(
        steps=steps,
        warmup_steps=round(rule.warmup_steps * scale),
        schedule="bit",
        lr_drops=[d for d in drops if d < steps],
    )
    if "schedule" in keep and cfg.schedule.name != "bit":  # another schedule, chosen explicitly
        keep = {*keep, "lr_drops"}
    augment = dict(
        mixup=rule.mixup,
        random_resized_crop=True,
        crop_scale=(rule.crop_area, rule.crop_area),
        hflip=True,
    )
    schedule = {("name" if k == "schedule" else k): v for k, v in schedule.items() if k not in keep}
    resolved = cfg.replace(
        schedule=schedule,
        optim={}
        if "lr" in keep
        else {"lr": BIT_LR * (cfg.optim.batch_size or BIT_BATCH) / BIT_BATCH},
        augment={k: v for k, v in augment.items() if k not in keep},
    )
    logger.info(
        "BiT-HyperRule for %d training images of %dx%d: %d steps (warm-up %s, lr / 10 at %s), "
        "lr %g at batch %d, mixup %g; BiT's resolution: resize %d, crop %d (here: crops of "
        "%.2f of the area, resized to the model's input)",
        len(train),
        *image_size,
        resolved.schedule.steps,
        resolved.schedule.warmup_steps,
        resolved.schedule.lr_drops,
        resolved.optim.lr,
        resolved.optim.batch_size or BIT_BATCH,
        resolved.augment.mixup,
        rule.resize,
        rule.crop,
        resolved.augment.crop_scale[0],
    )
    return resolved


PRESET_RESOLVERS["bit"] = bit_config
