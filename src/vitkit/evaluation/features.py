"""Frozen pre-logits features of a model: what few-shot, linear-probe and k-NN evaluation fit;
and the one evaluation input path, which ``vitkit.training.evaluate`` reads through as well.

The features are ``model.forward_head(model.forward_features(x), pre_logits=True)``: the
[class] token or the average of the tokens after the final norm, through the representation
layer when the model has one (the paper's pre-training models), i.e. what the head would see.
Images get the model's evaluation preprocessing (``eval_transform``: resize to the model's
resolution, match its channels, scale to [-1, 1]), batch by batch from a ``DataSource``
(``evaluation_inputs``), so features are those the model computes when it is evaluated, and
a streamed folder or shard set is never held in memory: only the features are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vitkit.data import AugmentConfig, BatchTransform, EvalPreprocessing, ImageDataset
from vitkit.data.base import Batch
from vitkit.data.sources import DataSource, InMemorySource, as_source


def eval_transform(model: Any, num_classes: int | None = None) -> BatchTransform:
    """The model's evaluation preprocessing (``EvalPreprocessing.of(model.cfg)``): match its
    channels, squash or crop to its resolution, scale: ``preprocess`` (the one evaluation path
    for tensors), with the labels as one-hot targets of ``num_classes`` (default: the model's;
    one class for a model without a head, whose targets nobody reads). Call it with
    ``cropped=batch.cropped``: a streamed source's batches already have the geometry
    (``prepare_source`` set it)."""
    cfg = model.cfg
    return BatchTransform(
        cfg.img_size,
        num_classes or cfg.num_classes or 1,
        AugmentConfig(),
        0,
        channels=cfg.in_chans,
        preprocessing=EvalPreprocessing.of(cfg),
    )


def prepare_source(model: Any, source: DataSource) -> None:
    """Tell ``source`` the model's input size and evaluation preprocessing, so that a
    streamed source crops files in its workers as ``preprocess_file`` does."""
    source.set_image_size(model.cfg.img_size, EvalPreprocessing.of(model.cfg))


def evaluation_inputs(
    model: Any,
    data: DataSource | ImageDataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, Batch]]:
    """(model inputs on the model's device, the batch they came from: labels, file names) for
    every image of ``data`` once (this process's share under ``world_size``): what
    ``evaluate`` scores and ``source_features`` embeds. A streamed source leaves out files it
    cannot decode (its ``skipped`` log)."""
    source = as_source(data)
    prepare_source(model, source)
    transform = eval_transform(model)
    device = next(model.parameters()).device
    for batch in source.eval_batches(batch_size, rank=rank, world_size=world_size):
        images = batch.images.to(device)
        placeholder = torch.zeros(len(images), dtype=torch.long)  # the targets are not used
        x, _ = transform(images, placeholder, False, batch.cropped)
        yield x, batch


@torch.no_grad()
def source_features(
    model: nn.Module, data: DataSource | ImageDataset, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) float32 CPU features of every image ``data`` hands out, and their labels (None
    for unlabelled data). Only the features are kept, so memory does not grow with the
    images' size: N is what was decoded (a streamed source skips unreadable files).

    Tells a streamed source the model's input size, runs in eval mode (dropout off) on the
    model's device and restores the model's mode.
    """
    source = as_source(data)
    if batch_size < 1 or len(source) == 0:
        raise ValueError(
            f"need at least one image and batch_size >= 1, got {len(source)} and {batch_size}"
        )
    net: Any = model  # any vitkit model: forward_features, forward_head(pre_logits=True)
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for x, batch in evaluation_inputs(model, source, batch_size):
            pooled = net.forward_head(net.forward_features(x), pre_logits=True)
            features.append(pooled.float().cpu())
            if batch.labels is not None:
                labels.append(batch.labels)
    finally:
        model.train(was_training)
    if not features:
        raise ValueError(f"none of the {len(source)} images could be read")
    return torch.cat(features), torch.cat(labels) if labels else None


def extract_features(
    model: nn.Module, images: torch.Tensor | ImageDataset | DataSource, batch_size: int = 256
) -> torch.Tensor:
    """(N, D) float32 CPU features of uint8 images (N, C, H, W), of a dataset's images or of
    the images a ``DataSource`` hands out (``source_features``, which also gives the labels).
    """
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 images (N, C, H, W), an ImageDataset or a DataSource, got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        unlabelled = ImageDataset(images, torch.zeros(len(images), dtype=torch.long), ["-"])
        images = InMemorySource(unlabelled, labelled=False)
    return source_features(model, images, batch_size)[0]
