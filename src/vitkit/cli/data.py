"""``vitkit data pack``: any dataset vitkit reads, written as WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from vitkit.data.base import DataSource
from vitkit.data.shards import parse_size, write_shards
from vitkit.data.sources import DataOptions, InMemorySource, open_splits
from vitkit.data.streaming import StreamingFolderSource
from vitkit.utils.runlayout import RunLayout


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="prepare datasets (pack WebDataset shards)",
        description="Dataset tools. `vitkit data pack SRC OUT` writes SRC (anything --data "
        "accepts) as WebDataset tar shards plus dataset.json (class names and counts), which "
        "`--data OUT` then streams.",
    )  # fmt: skip
    commands = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    pack = commands.add_parser(
        "pack", help="write a dataset as WebDataset shards",
        description="Write every split of SRC into OUT/<split>-NNNNNN.tar shards: image "
        "files are copied as they are, in-memory arrays (idx, CIFAR, .npz, digits) become "
        "PNG files. A single-split source gets its test split held out (20%%, stratified, "
        "by --seed), as training would hold it out; --val-fraction holds out validation "
        "shards too. Every shard is written under a temporary name and renamed.",
    )  # fmt: skip
    pack.add_argument("src", help="'digits', an image folder, idx / CIFAR folder, .npz or shards")
    pack.add_argument("out", type=Path, help="a new (or empty) folder for the shards")
    pack.add_argument(
        "--shard-size", default="500MB", help="largest shard, e.g. 500MB, 2GB (default: 500MB)"
    )
    pack.add_argument(
        "--val-fraction", type=float, default=0.0, help="validation split to hold out of "
        "train, stratified (default: 0, none)",
    )  # fmt: skip
    pack.add_argument("--seed", type=int, default=0, help="seed of the held-out splits (0)")
    pack.set_defaults(func=run_pack)


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


def run_pack(args: argparse.Namespace) -> int:
    shard_size = parse_size(args.shard_size)
    # Image folders are streamed: their files are copied into the shards without decoding.
    splits = open_splits(args.src, args.val_fraction, args.seed, DataOptions(in_memory="no"))
    info = splits.train.info
    named = {"train": shuffled(splits.train, args.seed), "val": splits.val, "test": splits.test}
    total = sum(len(s) for s in splits.sources())
    with tqdm(total=total, unit="img", dynamic_ncols=True) as bar:
        index = write_shards(
            named, args.out, shard_size, classes=info.classes or [], channels=info.channels,
            source=str(args.src), held_out_test=splits.held_out_test, progress=bar.update,
        )  # fmt: skip
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['count']} images in {len(entry['shards'])} shard(s)")
    listing = RunLayout(args.out).skipped  # beside the shards, named as in a run folder
    skipped = splits.report(listing)["skipped_files"]
    if skipped:
        print(f"left out {skipped} unreadable file(s), each listed in {listing}")
    print(f"wrote {args.out}; train with --data {args.out}")
    return 0
