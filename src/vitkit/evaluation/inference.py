"""Inference with a trained model: the one evaluation input path (``eval_transform``,
``evaluation_inputs``), evaluation (loss, accuracy, top-5 accuracy, confusion matrix, top-k
classes per image) and prediction, bfloat16 autocast, and the per-image predictions CSV.

Every image reaches a model through ``evaluation_inputs``: the model's ``EvalPreprocessing``
(match its channels, squash or crop to its resolution, scale to [-1, 1]) batch by batch from a
``DataSource``, so ``evaluate`` scores, ``predict`` ranks and ``vitkit.evaluation.features``
embeds exactly what the model sees when it is evaluated.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Self, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vitkit.data import (
    AugmentConfig,
    BatchTransform,
    EvalPreprocessing,
    ImageDataset,
    preprocess,
    preprocess_file,
)
from vitkit.data.base import Batch
from vitkit.data.sources import DataSource, as_source
from vitkit.models.registry import ModelConfig
from vitkit.utils.files import atomic_write

PREDICTIONS_TOP_K = 5  # classes per image in ``vitkit eval --predictions``
TOP_K_ACCURACY = 5  # ``Evaluation.top_k_accuracy``: top-5 (top-all with fewer classes)
TestTimeAugmentation = Literal["none", "flip", "flip_translate"]  # of ``evaluate``: ``tta_logits``
TTA_CHOICES: tuple[str, ...] = get_args(TestTimeAugmentation)


class ProcessShare(Protocol):
    """This process's place among the processes that share an evaluation (the training loop's
    ``Process``): its rank and how many there are."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...


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


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bfloat16 autocast for ``precision == "bf16"``, float16 for ``"fp16"``, else nothing."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
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


@dataclass(frozen=True)
class ImagePrediction:
    """One evaluated image: its file path (or its position in the source, for images without
    a file), its true label and the top classes (index, probability), most probable first."""

    name: str
    label: int
    top: list[tuple[int, float]]


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy
    confusion: torch.Tensor  # (classes, classes) counts, rows = true class, columns = predicted
    predictions: list[ImagePrediction] = field(default_factory=list)  # with ``top_k``
    # Images whose true class is among the ``top_k`` most probable (k = TOP_K_ACCURACY, or
    # the number of classes when there are fewer).
    top_k_correct: int = 0
    top_k: int = TOP_K_ACCURACY

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def top_k_accuracy(self) -> float:
        return self.top_k_correct / max(self.count, 1)

    @property
    def per_class_accuracy(self) -> list[float | None]:
        """Each class's share of its images predicted right (recall); None for a class with
        no image in the data."""
        images = self.confusion.sum(dim=1).tolist()
        right = self.confusion.diagonal().tolist()
        return [r / n if n else None for r, n in zip(right, images, strict=True)]

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
    process: ProcessShare | None = None,
    top_k: int = 0,
    tta: TestTimeAugmentation = "none",
) -> Evaluation:
    """Every image of ``data`` once, preprocessed by the model's ``EvalPreprocessing``; under
    DDP each process takes its share and the sums are added up, so the result is exact on any
    number of processes. With ``top_k``, each image's top classes are kept too
    (``Evaluation.predictions``, this process's images only). ``tta`` (``TTA_CHOICES``) scores
    the logits of ``tta_logits``."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}: choose one of {TTA_CHOICES}")
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
    k = min(TOP_K_ACCURACY, num_classes)
    top_k_correct = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    predictions: list[ImagePrediction] = []
    for x, batch in evaluation_inputs(model, source, batch_size, rank=rank, world_size=world_size):
        assert batch.labels is not None
        labels = batch.labels.to(device)
        with autocast(device, precision):
            logits = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        if top_k:
            start = len(predictions)
            names = batch.names or [str(start + i) for i in range(len(labels))]
            predictions += [
                ImagePrediction(name, int(label), top)
                for name, label, top in zip(
                    names, batch.labels.tolist(), top_classes(logits, top_k), strict=True
                )
            ]
        top_k_correct += (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum()
        confusion += torch.bincount(
            labels * num_classes + logits.argmax(-1), minlength=num_classes**2
        ).view(num_classes, num_classes)
    model.train(was_training)
    if process is not None and process.world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        dist.all_reduce(top_k_correct, op=dist.ReduceOp.SUM)
    # Over the images evaluated: a streamed source leaves out files it cannot decode.
    loss = float(loss_sum) / max(int(confusion.sum()), 1)
    return Evaluation(loss, confusion.cpu(), predictions, int(top_k_correct), k)


def tta_logits(model: Classifier, x: torch.Tensor, tta: TestTimeAugmentation) -> torch.Tensor:
    """The model's logits for the batch ``x`` (model inputs, ``(B, C, H, W)``).

    ``"flip"``: the mean of the logits of each image and of its mirror image (left-right),
    which is what a model trained with random flips has learnt to see both ways: twice the
    compute for usually a few tenths of a point of accuracy (docs/experiments.md).
    ``"flip_translate"``: half of that, plus half the mean of the same for the image moved
    one pixel down-right and one pixel up-left (reflected at the border), as airbench scores
    CIFAR-10; six forward passes, for models trained with flips and translations.
    """
    if tta == "none":
        return model(x)
    logits = _flip_mean(model, x)
    if tta == "flip_translate":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[-2:]
        # Contiguous copies: a compiled model would compile a graph of its own for the views.
        down_right = padded[..., :height, :width].contiguous()
        up_left = padded[..., 2:, 2:].contiguous()
        logits = logits / 2 + (_flip_mean(model, down_right) + _flip_mean(model, up_left)) / 4
    return logits


def _flip_mean(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    return (model(x).float() + model(x.flip(-1)).float()) / 2


def top_classes(logits: torch.Tensor, top_k: int) -> list[list[tuple[int, float]]]:
    """Per row of ``logits``: the ``top_k`` (class index, softmax probability), most probable
    first."""
    probs = logits.float().softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(int(i), float(p)) for p, i in zip(values, indices, strict=True)]
        for values, indices in zip(top.values.cpu(), top.indices.cpu(), strict=True)
    ]


@torch.no_grad()
def predict(
    model: Classifier, images: torch.Tensor | str | Path | Sequence[str | Path], top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-``top_k`` (class name, probability) of each image: uint8 (B, C, H, W) tensors
    (``preprocess``), or image files (``preprocess_file``, as a streamed ``vitkit eval`` reads
    them), by the model's ``EvalPreprocessing``."""
    device = next(model.parameters()).device
    cfg = model.cfg
    if isinstance(images, torch.Tensor):
        x = preprocess(images.to(device), cfg.img_size, cfg.in_chans, EvalPreprocessing.of(cfg))
    else:
        paths = [images] if isinstance(images, str | Path) else list(images)
        x = torch.cat([preprocess_file(path, cfg) for path in paths]).to(device)
    names = class_names(model)
    return [[(names[i], p) for i, p in row] for row in top_classes(model.eval()(x), top_k)]


def class_names(model: Classifier) -> list[str]:
    """The class names a vitkit training run stores in the config, else the indices."""
    names = model.cfg.extra.get("classes")
    if isinstance(names, list) and len(names) == model.cfg.num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(model.cfg.num_classes)]


def write_predictions(
    path: Path,
    result: Evaluation,
    model_classes: list[str],
    data_classes: list[str],
    first: str,
) -> None:
    """``result.predictions`` as a CSV file (atomically): ``first`` (path or index), the true
    class (the data's name), then ``pred1, prob1, ...`` (the model's names)."""
    top_k = max((len(p.top) for p in result.predictions), default=PREDICTIONS_TOP_K)
    header = [first, "true"] + [f"{c}{i}" for i in range(1, top_k + 1) for c in ("pred", "prob")]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for p in result.predictions:
                ranked = [v for i, prob in p.top for v in (model_classes[i], f"{prob:.6f}")]
                writer.writerow([p.name, data_classes[p.label], *ranked])

    atomic_write(path, write)
