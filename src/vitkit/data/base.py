"""What every data source shares: the batch it hands out, its description, the protocol the
loop and the evaluators read, and the record of the files a streamed source had to skip.

Split out of ``sources.py`` so that the streamed sources (``streaming.py``, ``shards.py``) and
the function that picks between them (``sources.open_splits``) import one way.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from vitkit.models.preprocessing import EvalPreprocessing

logger = logging.getLogger(__name__)

SHOWN_SKIPPED = 3
# The most of a split that may be unreadable before reading stops with an error: a few broken
# files in a photo folder are skipped, a folder of broken files (or of something else) is not
# "trained on" in silence. ``max_unreadable_fraction`` in the config, flags and DataOptions.
MAX_UNREADABLE_FRACTION = 0.1

# Held-out splits stand in for each other: data with train/ and val/ folders (Imagenette) is
# tested on val/, and "val" of data with only a test split is its test split.
STAND_IN_SPLIT = {"val": "test", "test": "val"}


@functools.cache
def note_stand_in(data: str, split: str, found: str) -> None:
    """Say, once a process, that ``data``'s ``found`` split is read where ``split`` was asked
    for, so that no score is printed under the name of a split it was not computed on."""
    logger.info("%s has no %s split: its %s split stands in for it", data, split, found)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # uint8 (B, C, H, W)
    labels: torch.Tensor | None  # int64 (B,), None for unlabelled data
    # The images are already at the model's size, cropped from their originals in a streamed
    # source's workers (training: the random-resized crop; evaluation: the model's
    # EvalPreprocessing): the batch transform skips its own crop or resize and does the rest.
    cropped: bool = False
    names: tuple[str, ...] | None = None  # the images' file paths, where the source knows them
    # Training batches: a number per image that is the same in every epoch (its position in
    # the split; a shard sample's, the CRC-32 of its name), and the epoch; alternating flips
    # read both. None from a source that cannot tell.
    image_ids: torch.Tensor | None = None  # int64 (B,)
    epoch: int = 0


@dataclass(frozen=True)
class SourceInfo:
    classes: list[str] | None  # class names (index = label); None for unlabelled data
    channels: int
    num_examples: int


class DataSource(Protocol):
    @property
    def info(self) -> SourceInfo: ...

    def __len__(self) -> int: ...

    def set_image_size(
        self, size: tuple[int, int], preprocessing: EvalPreprocessing | None = None
    ) -> None:
        """The model's input size and evaluation preprocessing (default
        ``EvalPreprocessing()``), known once the model is built: streamed sources decode and
        crop to them, in-memory ones ignore them (the batch transform applies them)."""
        ...

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Shuffled batches of ``batch_size`` images (per process) of ``epoch``, from batch
        ``start`` on; the order depends only on ``(seed, epoch)``, ranks get disjoint images,
        and every rank gets the same number of full batches."""
        ...

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """Every example exactly once over the ``world_size`` processes, in order."""
        ...


@dataclass(frozen=True)
class EncodedSample:
    """One image as a file's bytes (``ext``: jpg, png, ...), with its label: what a shard
    stores and what every source hands ``shards.write_shards``."""

    ext: str
    data: bytes
    label: int


def default_workers() -> int:
    """Loader worker processes per training process: ``min(4, CPUs)``."""
    return min(4, os.cpu_count() or 1)


def check_unreadable(what: str, skipped: list[str], total: int, max_fraction: float) -> None:
    """ValueError when more than ``max_fraction`` of the ``total`` files (or samples) of
    ``what`` are unreadable: a count that only grows, so it can be checked as files are
    skipped, and stops a folder of mostly broken files early."""
    if total and len(skipped) > max_fraction * total:
        raise ValueError(
            f"{what}: {len(skipped)} of its {total} images are unreadable, more than "
            f"max_unreadable_fraction {max_fraction:g} allows (e.g. "
            f"{'; '.join(skipped[:SHOWN_SKIPPED])}): check that this is the right data, "
            "repair or remove the broken files, or raise --max-unreadable-fraction"
        )


def check_fraction(max_fraction: float) -> float:
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {max_fraction}")
    return max_fraction


class SkipLog:
    """The unreadable files (or shards, or samples) a source skipped, by name.

    Decoding happens in loader workers, so the names travel back with each batch and are
    collected here, in the process that runs the loop: the first few are logged by name as
    they turn up, the count goes into the run's summary and every name into its
    ``skipped_files.txt`` (``Splits.report``). ``total`` is the number of files the names
    come from (the split's); once more than ``max_fraction`` of them were skipped, ``add``
    raises ``check_unreadable``'s ValueError.
    """

    def __init__(
        self, what: str, total: int = 0, max_fraction: float = MAX_UNREADABLE_FRACTION
    ) -> None:
        self.what = what  # e.g. "/data/photos": where the skipped things are
        self.total = total
        self.max_fraction = check_fraction(max_fraction)
        self.skipped: dict[str, None] = {}  # ordered set of "name (reason)"

    def add(self, names: list[str]) -> None:
        for name in names:
            if name in self.skipped:
                continue
            self.skipped[name] = None
            if len(self.skipped) <= SHOWN_SKIPPED:
                logger.warning("%s: skipped %s", self.what, name)
            elif len(self.skipped) == SHOWN_SKIPPED + 1:
                logger.warning(
                    "%s: skipping more unreadable files, counted but not named here",
                    self.what,
                )
        check_unreadable(self.what, list(self.skipped), self.total, self.max_fraction)
