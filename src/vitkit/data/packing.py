"""``vitkit data pack``: any source vitkit reads, written as WebDataset shards with its splits.

The splits are those training would use (``open_splits``: a single-split source gets its test
split held out, stratified), the training samples shuffled so that a reader's small shuffle
buffer still mixes the classes, and every unreadable file left out and listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitkit.data.base import MAX_UNREADABLE_FRACTION, DataSource
from vitkit.data.shards import write_shards
from vitkit.data.sources import DataOptions, InMemorySource, open_splits
from vitkit.data.streaming import StreamingFolderSource
from vitkit.utils.runlayout import RunLayout


@dataclass
class Packed:
    """What ``pack`` wrote: ``dataset.json``'s content, and how many unreadable files it left
    out, each listed in ``skipped_listing``."""

    index: dict[str, Any]
    skipped: int
    skipped_listing: Path


def shuffled(source: DataSource, seed: int) -> DataSource:
    """The training samples in a random order. Folders list their images class by class, and
    a reader's shuffle buffer (a few hundred samples) cannot mix that: every batch would hold
    one or two classes, which trains a model to predict the current class, not the image.
    Shards packed from shards keep their order (shuffled when they were packed)."""
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    if isinstance(source, StreamingFolderSource):
        return source.subset(order)
    if isinstance(source, InMemorySource):
        return InMemorySource(source.dataset.subset(order), source.labelled)
    return source


def pack(
    src: str,
    out: Path,
    shard_size: int,
    val_fraction: float = 0.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
) -> Packed:
    """Write every split of ``src`` into ``out/<split>-NNNNNN.tar`` shards of at most
    ``shard_size`` bytes (``write_shards``); ``on_total(n)`` hears how many images there are
    before the first is written, ``progress(n)`` after each. More than
    ``max_unreadable_fraction`` of a split unreadable stops the packing."""
    options = DataOptions(in_memory="no", max_unreadable_fraction=max_unreadable_fraction)
    splits = open_splits(src, val_fraction, seed, options)
    info = splits.train.info
    if info.classes is None:
        raise ValueError(
            f"{src} has no labels (its images are not in class folders): shards store a label "
            f"with every image. Put each class's images in a folder of its own "
            f"({src}/<class>/<image>), or pre-train on it as it is: `vitkit pretrain --data {src}`"
        )
    named = {"train": shuffled(splits.train, seed), "val": splits.val, "test": splits.test}
    if on_total is not None:
        on_total(sum(len(s) for s in splits.sources()))
    index = write_shards(
        named,
        out,
        shard_size,
        classes=info.classes or [],
        channels=info.channels,
        source=str(src),
        held_out_test=splits.held_out_test,
        progress=progress,
    )
    listing = RunLayout(out).skipped  # beside the shards, named as in a run folder
    skipped = splits.report(listing)["skipped_files"]
    return Packed(index, skipped, listing)
