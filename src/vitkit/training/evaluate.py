"""Evaluation and prediction with a trained model: loss, accuracy, confusion matrix, top-k."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, Self

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.data import ImageDataset, preprocess
from vitkit.data.sources import DataSource, as_source
from vitkit.evaluation.features import eval_transform as eval_transform  # its public home was here
from vitkit.evaluation.features import evaluation_inputs
from vitkit.models.registry import ModelConfig
from vitkit.training.distributed import Process, all_reduce_sum


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bfloat16 autocast for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Classifier(Protocol):
    """What evaluation and prediction use of a model: a model of any registered architecture,
    or a deployed one (``vitkit.deploy``), which is no ``PretrainedModel`` but has its ``cfg``."""

    training: bool

    @property
    def cfg(self) -> ModelConfig: ...
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def eval(self) -> Self: ...
    def train(self, mode: bool = True) -> Self: ...


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy
    confusion: torch.Tensor  # (classes, classes) counts, rows = true class, columns = predicted

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(self.confusion.diagonal().sum())

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


@torch.no_grad()
def evaluate(
    model: Classifier,
    data: DataSource | ImageDataset,
    batch_size: int = 512,
    precision: str = "fp32",
    process: Process | None = None,
) -> Evaluation:
    """Every image of ``data`` once; under DDP each process takes its share and the sums are
    added up, so the result is exact on any number of processes."""
    source = as_source(data)
    device = next(model.parameters()).device
    rank, world_size = (process.rank, process.world_size) if process else (0, 1)
    num_classes = model.cfg.num_classes
    classes = source.info.classes or []
    if len(classes) != num_classes:
        raise ValueError(
            f"the data has {len(classes)} classes but the model predicts {num_classes}"
        )
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for x, batch_labels in evaluation_inputs(
        model, source, batch_size, rank=rank, world_size=world_size
    ):
        assert batch_labels is not None
        labels = batch_labels.to(device)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        confusion += torch.bincount(
            labels * num_classes + logits.argmax(-1), minlength=num_classes**2
        ).view(num_classes, num_classes)
    model.train(was_training)
    if process is not None:
        all_reduce_sum(loss_sum, process)
        all_reduce_sum(confusion, process)
    # Over the images evaluated: a streamed source leaves out files it cannot decode.
    return Evaluation(float(loss_sum) / max(int(confusion.sum()), 1), confusion.cpu())


@torch.no_grad()
def predict(
    model: Classifier, images: torch.Tensor, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-``top_k`` (class name, probability) of each uint8 image (B, C, H, W)."""
    device = next(model.parameters()).device
    x = preprocess(images.to(device), model.cfg.img_size, model.cfg.in_chans)
    probs = model.eval()(x).float().softmax(-1)
    names = class_names(model)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(names[int(i)], float(p)) for p, i in zip(values, indices, strict=True)]
        for values, indices in zip(top.values, top.indices, strict=True)
    ]


def class_names(model: Classifier) -> list[str]:
    """The class names a vitkit training run stores in the config, else the indices."""
    names = model.cfg.extra.get("classes")
    if isinstance(names, list) and len(names) == model.cfg.num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(model.cfg.num_classes)]
