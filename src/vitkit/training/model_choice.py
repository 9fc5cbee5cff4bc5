"""The model of a run that names none: one that fits the data.

``vitkit train`` with no options trains the small ViT of the shipped 8x8 digits; the same
command on a folder of photos must not train that model on photos shrunk to 8x8 pixels. So
without ``--model`` the run takes the registered model made for images like the data's (their
channels, shorter side and number), says which and why in one log line, and records it in
config.json (a resumed run reads it from there). A config that names a model is never
second-guessed. When the images' size cannot be told (WebDataset shards), the run refuses
and names the sensible choices.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

from vitkit.data.base import DataSource
from vitkit.data.images import open_image, upright_size
from vitkit.data.sources import InMemorySource
from vitkit.data.streaming import StreamingFolderSource

logger = logging.getLogger(__name__)

SAMPLED_HEADERS = 32  # image headers read to judge a folder's typical size
# Photos from fewer images than this train at PHOTO_SMALL_SIDE pixels: enough detail to learn
# from, at a twentieth of 224 pixels' compute.
MANY_IMAGES = 10_000
PHOTO_SMALL_SIDE, PHOTO_FULL_SIDE = 96, 224
CHOICES = (
    "--model vit_digits (8x8 pixels), vit_mnist (28x28 grey), vit_cifar (32x32 colour), or "
    "vit_ti16 --img-size 96 (photos; 224 for ten thousand or more)"
)


@dataclass(frozen=True)
class ModelChoice:
    model: str
    img_size: int | None  # None: the model's own
    reason: str


def image_side(source: DataSource) -> int | None:
    """The typical shorter side of the images in pixels: exact for data in memory, the
    median of a sample of headers for a folder read from disk; None for shards."""
    if isinstance(source, InMemorySource):
        return int(min(source.dataset.images.shape[-2:]))
    if isinstance(source, StreamingFolderSource):
        listing = source.listing
        sides = []
        for name in listing.files[:: max(1, len(listing.files) // SAMPLED_HEADERS)]:
            try:
                with open_image(listing.root / name) as image:
                    sides.append(min(upright_size(image)))
            except (ValueError, FileNotFoundError):
                continue  # an unreadable file says nothing about the others
        return int(statistics.median(sides)) if sides else None
    return None


def choose_model(data: str, source: DataSource) -> ModelChoice:
    """The registered model for ``source``'s images (module docstring); a ValueError that
    lists the choices when their size cannot be told."""
    side, channels, count = image_side(source), source.info.channels, len(source)
    if side is None:
        raise ValueError(
            f"the size of {data}'s images cannot be told without decoding them, so no model "
            f"fits them by default: choose one, {CHOICES}"
        )
    colour = "grey" if channels == 1 else "colour"
    seen = f"{count:,} {colour} images of about {side} px"
    if side <= 12:
        return ModelChoice("vit_digits", None, f"{seen}: the model of the 8x8 digits")
    if side <= 28 and channels == 1:
        return ModelChoice("vit_mnist", None, f"{seen}: the model of MNIST's 28x28 digits")
    if side <= 48:
        if channels == 1:
            return ModelChoice("vit_mnist", None, f"{seen}: the model of 28x28 grey images")
        return ModelChoice("vit_cifar", None, f"{seen}: the model of CIFAR's 32x32 images")
    size = PHOTO_FULL_SIDE if count >= MANY_IMAGES and side >= PHOTO_FULL_SIDE else PHOTO_SMALL_SIDE
    return ModelChoice(
        "vit_ti16",
        size,
        f"{seen}: photos, for ViT-Ti/16 (the smallest of the paper's family) "
        f"at {size} px" + (" for so few images" if size == PHOTO_SMALL_SIDE else ""),
    )
