"""Frozen pre-logits features of a model: what few-shot, linear-probe and k-NN evaluation fit;
read through the one evaluation input path (``vitkit.evaluation.inference``).

The features are ``model.forward_head(model.forward_features(x), pre_logits=True)``: the
[class] token or the average of the tokens after the final norm, through the representation
layer when the model has one (the paper's pre-training models), i.e. what the head would see.
Images get the model's evaluation preprocessing (``eval_transform``: resize to the model's
resolution, match its channels, scale to [-1, 1]), batch by batch from a ``DataSource``
(``evaluation_inputs``), so features are those the model computes when it is evaluated, and
a streamed folder or shard set is never held in memory: only the features are kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitkit.data import ImageDataset
from vitkit.data.sources import DataSource, InMemorySource, as_source
from vitkit.evaluation.inference import (  # their home was here
    eval_transform as eval_transform,
)
from vitkit.evaluation.inference import evaluation_inputs
from vitkit.evaluation.inference import prepare_source as prepare_source


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
    # One buffer of N rows, filled in place. Kept as a list of small per-batch copies, the
    # features took the holes a batch's freed activations left in glibc's heap, so the next
    # batch's activations did not fit there and the heap grew by a batch's activations every
    # batch (docs/experiments.md, Where a step's time goes).
    features: torch.Tensor | None = None
    labels = torch.empty(len(source), dtype=torch.long)
    count, labelled = 0, False
    try:
        for x, batch in evaluation_inputs(model, source, batch_size):
            pooled = net.forward_head(net.forward_features(x), pre_logits=True)
            if features is None:
                features = torch.empty(len(source), pooled.shape[1], dtype=torch.float32)
            features[count : count + len(pooled)] = pooled  # a copy: float32, on the CPU
            if batch.labels is not None:
                labels[count : count + len(pooled)] = batch.labels
                labelled = True
            count += len(pooled)
    finally:
        model.train(was_training)
    if features is None:
        raise ValueError(f"none of the {len(source)} images could be read")
    if count < len(source):  # unreadable files skipped: the rows they left are dropped
        features, labels = features[:count].clone(), labels[:count].clone()
    return features, labels if labelled else None


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
