"""Progressive resizing (``schedule.resize_start``, ``schedule.resize_ramp``): the first part of
a run trains on smaller images, whose steps are faster (a ViT's cost grows with its number of
patches), and the image size grows to the model's own before the end, so the last steps train
at the size the model is evaluated and used at. FFCV trains ResNets on ImageNet this way; a ViT
takes the smaller images because its position embeddings are resized on the fly
(``dynamic_img_size``), as when fine-tuning at another resolution.

``schedule.resize_regularization`` weakens the augmentations on the small images and
strengthens them as the images grow (EfficientNetV2's adaptive regularization: a network
trained on small images fits less, so it needs weaker regularisation there).
"""

from __future__ import annotations

from torch import nn

from vitkit.models.vit import VisionTransformer


def size_multiple(model: nn.Module) -> tuple[int, int]:
    """The step of the image sizes ``model`` takes: its patch, times a hybrid's backbone
    reduction. Only ViT-family models resize (their position embeddings interpolate)."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"progressive resizing (schedule.resize_start) needs a ViT-family model, not a "
            f"{type(model).__name__}: leave resize_start at 1"
        )
    return model.patch_embed.reduction


def training_size(
    full: tuple[int, int],
    multiple: tuple[int, int],
    start: float,
    ramp: tuple[float, float],
    progress: float,
) -> tuple[int, int]:
    """The training image size at ``progress`` (the steps done over the run's steps):
    ``start`` times ``full`` until ``ramp[0]``, growing linearly to ``full`` at ``ramp[1]``;
    each side rounded down to a multiple of ``multiple``, and never under one of it."""
    begin, end = ramp
    if start >= 1.0 or progress >= end:
        return full
    grown = 0.0 if progress <= begin else (progress - begin) / (end - begin)
    fraction = start + (1.0 - start) * grown
    # 1e-6 px keeps a side that is a whole multiple in exact arithmetic from rounding down.
    height, width = (
        max(step, int(side * fraction + 1e-6) // step * step)
        for side, step in zip(full, multiple, strict=True)
    )
    return height, width


def regularization_strength(
    size: tuple[int, int], full: tuple[int, int], start: float, regularization: float
) -> float:
    """The fraction of the augmentations' full strength at training size ``size``:
    ``regularization`` at ``start`` times the ``full`` size (or below, where the sides were
    rounded down), growing linearly with the mean side fraction to 1 at the full size."""
    if start >= 1.0:
        return 1.0
    side = sum(s / f for s, f in zip(size, full, strict=True)) / len(full)
    grown = min(max((side - start) / (1.0 - start), 0.0), 1.0)
    return regularization + (1.0 - regularization) * grown
