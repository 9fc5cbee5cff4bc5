"""Decoding image files (``read_image``) and making model inputs of uint8 tensors
(``preprocess``).

``preprocess`` is the one evaluation path for images already in memory: it applies the
model's ``EvalPreprocessing`` (squash or centre crop, bilinear, value range) in torch. Image
*files* are decoded straight to the model's size by ``vitkit.data.streaming.load_view`` (so a
large JPEG decodes at a reduced size), with the same geometry; ``preprocess(prepared=True)``
then does the rest. Every evaluation tool goes through these two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from PIL import Image, ImageOps

from vitkit.models.preprocessing import EvalPreprocessing

# Pillow modes whose pixels are one grey value (with or without alpha); others become RGB.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
ORIENTATION_TAG = 0x0112


class UnreadableImage(ValueError):
    """A file Pillow cannot decode (corrupt, not an image, over the decompression-bomb
    limit); ``reason`` is Pillow's own words."""

    def __init__(self, path: Path, err: Exception, shown: str | None = None) -> None:
        # Pillow often repeats the path (``shown``: how it wrote the file, if not so)
        self.reason = str(err).replace(shown or str(path), path.name)
        super().__init__(f"{path} is not an image Pillow can read ({self.reason})")


# EXIF orientations (5..8) that turn the picture a quarter: its width and height swap.
QUARTER_TURNS = frozenset({5, 6, 7, 8})


@contextmanager
def open_image(file: str | Path | BinaryIO, name: str | None = None) -> Iterator[Image.Image]:
    """Pillow's lazy image of ``file`` (a path or bytes in a file object, named ``name`` in
    errors): only the header is read until ``upright`` decodes it. Raises
    ``FileNotFoundError`` for a missing file and ``UnreadableImage`` (a ``ValueError``) for a
    folder or anything Pillow cannot decode, also while decoding inside the ``with``."""
    path = Path(file) if isinstance(file, str | Path) else Path(name or "?")
    if path.is_dir():
        raise ValueError(f"image {file} is a folder: give an image file")
    try:
        with Image.open(file) as image:
            yield image
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(
            path, err, None if isinstance(file, str | Path) else repr(file)
        ) from None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of ``image`` once its EXIF orientation is applied, from the header."""
    turned = image.getexif().get(ORIENTATION_TAG) in QUARTER_TURNS
    return (image.height, image.width) if turned else image.size


def upright(image: Image.Image, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``image`` as grey (``L``) or ``RGB`` pixels, upright.

    ``draft`` (upright width, height) lets a JPEG decode at 1/2, 1/4 or 1/8 of its size, as
    long as it stays at least that large: a 12-megapixel photo cropped to 224 pixels costs a
    fraction of a full decode. Other formats ignore it.
    """
    if draft is not None:
        stored = draft[::-1] if image.getexif().get(ORIENTATION_TAG) in QUARTER_TURNS else draft
        image.draft(None, (max(1, stored[0]), max(1, stored[1])))
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("L", "RGB"):
        image.load()
        return image
    grey = image.mode in GREY_MODES or image.mode.startswith("I;16")
    return image.convert("L" if grey else "RGB")


def read_image(path: str | Path) -> np.ndarray:
    """One image file as (H, W) grey or (H, W, 3) RGB uint8 pixels, upright.

    The EXIF orientation (how a camera says the picture was held) is applied, as image
    viewers do; an alpha channel is dropped; palette, CMYK and other colour modes become RGB,
    grey modes (1-bit, 16-bit, float, with alpha) grey. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a folder or a file Pillow cannot read.
    """
    with open_image(path) as image:
        return np.asarray(upright(image))


def load_image(path: str | Path) -> torch.Tensor:
    """``read_image`` as a uint8 batch of one, (1, C, H, W) with C = 1 or 3."""
    pixels = read_image(path)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(pixels.copy()).unsqueeze(0)  # a writable, contiguous copy


def to_model_input(
    images: torch.Tensor, preprocessing: EvalPreprocessing | None = None
) -> torch.Tensor:
    """uint8 (B, C, H, W) (or floats in 0..255) -> float32 scaled as ``preprocessing`` says;
    by default [-1, 1], ``(x - 127.5) / 127.5`` as the official code."""
    p = preprocessing or EvalPreprocessing()
    return (images.float() - 255.0 * p.mean) / (255.0 * p.std)


def check_batch(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}"
        )


def match_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Float (B, C, H, W) images with ``channels`` channels: grey repeated to RGB, RGB to grey
    by the ITU-R 601 luma weights; ``None`` keeps the input's."""
    if channels is None or images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if images.shape[1] == 3 and channels == 1:
        return rgb_to_grayscale(images)
    raise ValueError(f"cannot turn {images.shape[1]}-channel images into {channels}")


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float (B, C, H, W) images resized to ``size`` (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size, mode="bilinear", antialias=True)


def crop_box(images: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """The pixels of (B, C, H, W) images inside ``box`` (left, top, width, height), its
    edges rounded to whole pixels."""
    left, top, width, height = box
    x0, y0 = round(left), round(top)
    x1, y1 = max(round(left + width), x0 + 1), max(round(top + height), y0 + 1)
    return images[..., y0:y1, x0:x1]


def preprocess(
    images: torch.Tensor,
    img_size: tuple[int, int],
    channels: int | None,
    preprocessing: EvalPreprocessing | None = None,
    *,
    prepared: bool = False,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> model inputs: ``channels`` channels, ``img_size``, scaled, by the
    evaluation ``preprocessing`` (default: ``EvalPreprocessing()``, squash to ``img_size``).

    ``prepared`` images already have ``preprocessing``'s geometry at ``img_size`` (a streamed
    source or ``load_view`` made them from the file): only channels and scaling are left.
    """
    check_batch(images)
    p = preprocessing or EvalPreprocessing()
    pixels = match_channels(images.float(), channels)
    if prepared:
        if tuple(pixels.shape[-2:]) != tuple(img_size):
            raise ValueError(
                f"prepared images are {tuple(pixels.shape[-2:])}, not the model's {tuple(img_size)}"
            )
    else:
        pixels = crop_box(pixels, p.box(pixels.shape[-1], pixels.shape[-2], img_size))
        pixels = resize(pixels, img_size)
    return to_model_input(pixels, p)


__all__ = [
    "check_batch",
    "crop_box",
    "load_image",
    "match_channels",
    "preprocess",
    "read_image",
    "resize",
    "to_model_input",
    "upright",
    "upright_size",
]
