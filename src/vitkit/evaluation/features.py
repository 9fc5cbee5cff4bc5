"""Frozen pre-logits features of a model: what few-shot, linear-probe and k-NN evaluation fit.

The features are ``model.forward_head(model.forward_features(x), pre_logits=True)``: the
[class] token or the average of the tokens after the final norm, through the representation
layer when the model has one (the paper's pre-training models), i.e. what the head would see.
Images get the model's evaluation preprocessing (``BatchTransform`` with ``train=False``:
resize to the model's resolution, match its channels, scale to [-1, 1]), so features are
those the model computes when it is evaluated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitkit.data import AugmentConfig, BatchTransform, EvalPreprocessing, ImageDataset


@torch.no_grad()
def extract_features(
    model: nn.Module, images: torch.Tensor | ImageDataset, batch_size: int = 256
) -> torch.Tensor:
    """(N, D) float32 CPU features of uint8 images (N, C, H, W) or of a dataset's images.

    Runs in eval mode (dropout off) on the model's device and restores the model's mode.
    """
    if isinstance(images, ImageDataset):
        images = images.images
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images (N, C, H, W) or an ImageDataset, got {images.dtype} of "
            f"shape {tuple(images.shape)}"
        )
    if batch_size < 1 or len(images) == 0:
        raise ValueError(
            f"need at least one image and batch_size >= 1, got {len(images)} and {batch_size}"
        )
    cfg: Any = model.cfg
    net: Any = model  # any vitkit model: forward_features, forward_head(pre_logits=True)
    # Evaluation mode ignores the labels but builds one-hot targets: one class suffices.
    transform = BatchTransform(
        cfg.img_size,
        1,
        AugmentConfig(),
        0,
        channels=cfg.in_chans,
        preprocessing=EvalPreprocessing.of(cfg),
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        x, _ = transform(batch, torch.zeros(len(batch), dtype=torch.long), train=False)
        pooled = net.forward_head(net.forward_features(x), pre_logits=True)
        features.append(pooled.float().cpu())
    model.train(was_training)
    return torch.cat(features)
