"""Data sources: what the training loop and the evaluators read, whatever holds the images.

A ``DataSource`` hands out batches of uint8 images (and labels, when it has them) for one
process of a run. Training asks for the batches of an epoch *from a given batch on*, so a run
resumed in the middle of an epoch continues with exactly the images it would have seen;
evaluation asks for every example exactly once over all processes. The loop never learns
whether the images sit in memory or are streamed from disk: ``InMemorySource`` is the first
implementation, streaming sources plug in behind the same two methods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from vitkit.data.datasets import ImageDataset, differing_classes, iterate_batches
from vitkit.data.readers import load_dataset, read_unlabelled

logger = logging.getLogger(__name__)

HELD_OUT_TEST = 0.2


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W)
    labels: torch.Tensor | None  # int64 (B,), None for unlabelled data


@dataclass(frozen=True)
class SourceInfo:
    classes: list[str] | None  # class names (index = label); None for unlabelled data
    channels: int
    num_examples: int


class DataSource(Protocol):
    @property
    def info(self) -> SourceInfo: ...

    def __len__(self) -> int: ...

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start: int = 0, rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:  # fmt: skip
        """Shuffled batches of ``batch_size`` images (per process) of ``epoch``, from batch
        ``start`` on; the order depends only on ``(seed, epoch)``, ranks get disjoint images,
        and every rank gets the same number of full batches."""
        ...

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """Every example exactly once over the ``world_size`` processes, in order."""
        ...


class InMemorySource:
    """A ``DataSource`` over an ``ImageDataset`` held in memory; with ``labelled=False`` its
    labels are hidden (``classes`` and ``Batch.labels`` None), for unlabelled images."""

    def __init__(self, dataset: ImageDataset, labelled: bool = True) -> None:
        self.dataset = dataset
        self.labelled = labelled

    @property
    def info(self) -> SourceInfo:
        classes = list(self.dataset.classes) if self.labelled else None
        return SourceInfo(classes, self.dataset.images.shape[1], len(self))

    def __len__(self) -> int:
        return len(self.dataset)

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start: int = 0, rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:  # fmt: skip
        batches = iterate_batches(
            self.dataset, batch_size, shuffle=True, seed=seed, epoch=epoch, rank=rank,
            world_size=world_size, drop_last=True, start=start,
        )  # fmt: skip
        for images, labels in batches:
            yield Batch(images, labels if self.labelled else None)

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        shard = self.dataset.subset(torch.arange(rank, len(self.dataset), world_size))
        for images, labels in iterate_batches(shard, batch_size, shuffle=False, seed=0, epoch=0):
            yield Batch(images, labels if self.labelled else None)


def as_source(data: DataSource | ImageDataset) -> DataSource:
    return InMemorySource(data) if isinstance(data, ImageDataset) else data


@dataclass
class Splits:
    train: DataSource
    val: DataSource | None
    test: DataSource
    held_out_test: bool = False  # the source had one split; test was held out of it


def open_splits(data: str, val_fraction: float, seed: int, train_fraction: float = 1.0) -> Splits:
    """The train, validation (held out of train, stratified; None for ``val_fraction == 0``)
    and test sources of ``data``.

    ``train_fraction`` < 1 keeps a stratified subset of the training split (before the
    validation images are held out of it), for data-size experiments: the subsets of one
    ``seed`` are nested (each class draws one permutation and keeps a prefix of it), and the
    test split is the same whatever the fraction.

    A source with a single split (a folder of class folders, one .npz of images/labels) comes
    back whole for every split name: a stratified ``HELD_OUT_TEST`` of it, chosen by ``seed``,
    becomes the test split instead of testing on training images. ``vitkit eval`` uses the
    same function, so with the run's seed it evaluates on the run's own test images. An
    unlabelled folder (``read_unlabelled``) is split the same way into sources without labels.
    """
    unlabelled = read_unlabelled(data)
    if unlabelled is None:
        train, test = load_dataset(data, "train"), load_dataset(data, "test")
    else:
        train = test = as_unlabelled_dataset(unlabelled)
    single_split = same_images(train, test)
    if single_split:
        logger.warning("%s has no separate test split: holding out %.0f%% of it", data,
                       100 * HELD_OUT_TEST)  # fmt: skip
        train, test = train.split(HELD_OUT_TEST, seed)
    if train.classes != test.classes:
        raise ValueError(
            f"{data}: {differing_classes(train.classes, test.classes, 'the train split', 'the test split')}; "
            "give both the same class folders"
        )
    if train_fraction < 1.0:
        train = train.split(train_fraction, seed)[1]
        counts = torch.bincount(train.labels, minlength=len(train.classes))
        if (counts == 0).any():
            empty = train.classes[int(torch.nonzero(counts == 0)[0])]
            raise ValueError(
                f"train_fraction {train_fraction} leaves class {empty!r} of {data} without "
                "training images: raise the fraction"
            )
    val = None
    if val_fraction > 0:
        train, val = train.split(val_fraction, seed)
    labelled = unlabelled is None
    return Splits(
        InMemorySource(train, labelled), InMemorySource(val, labelled) if val else None,
        InMemorySource(test, labelled), held_out_test=single_split,
    )  # fmt: skip


def as_unlabelled_dataset(images: torch.Tensor) -> ImageDataset:
    """Unlabelled images as a dataset of one placeholder class, so that the stratified splits
    of ``open_splits`` are plain random ones; ``InMemorySource(labelled=False)`` hides it."""
    return ImageDataset(images, torch.zeros(len(images), dtype=torch.long), ["unlabelled"])


def same_images(first: ImageDataset, second: ImageDataset) -> bool:
    """Whether two splits are the same images: a single-split source returns itself for
    every split name."""
    return torch.equal(first.labels, second.labels) and torch.equal(first.images, second.images)
