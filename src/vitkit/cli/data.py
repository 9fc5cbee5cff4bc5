"""``vitkit data pack``: any dataset vitkit reads, written as WebDataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from vitkit.data.base import MAX_UNREADABLE_FRACTION
from vitkit.data.packing import pack
from vitkit.data.shards import parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="prepare datasets (pack WebDataset shards)",
        description="Dataset tools. `vitkit data pack SRC OUT` writes SRC (anything --data "
        "accepts) as WebDataset tar shards plus dataset.json (class names and counts), which "
        "`--data OUT` then streams.",
    )
    commands = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    pack = commands.add_parser(
        "pack",
        help="write a dataset as WebDataset shards",
        description="Write every split of SRC into OUT/<split>-NNNNNN.tar shards: image "
        "files are copied as they are, in-memory arrays (idx, CIFAR, .npz, digits) become "
        "PNG files. A single-split source gets its test split held out (20%%, stratified, "
        "by --seed), as training would hold it out; --val-fraction holds out validation "
        "shards too. Every shard is written under a temporary name and renamed.",
    )
    pack.add_argument(
        "src",
        help="'digits', an image folder, idx / CIFAR folder, .npz, shards or a Hugging Face dataset",
    )
    pack.add_argument("out", type=Path, help="a new (or empty) folder for the shards")
    pack.add_argument(
        "--shard-size", default="500MB", help="largest shard, e.g. 500MB, 2GB (default: 500MB)"
    )
    pack.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="validation split to hold out of train, stratified (default: 0, none)",
    )
    pack.add_argument("--seed", type=int, default=0, help="seed of the held-out splits (0)")
    pack.add_argument(
        "--max-unreadable-fraction",
        type=float,
        default=MAX_UNREADABLE_FRACTION,
        metavar="F",
        help="share of a split's files that may be left out as unreadable, 0 to 1 "
        "(default: %(default)s)",
    )
    pack.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    with tqdm(unit="img", dynamic_ncols=True) as bar:

        def set_total(total: int) -> None:
            bar.total = total
            bar.refresh()

        packed = pack(
            args.src,
            args.out,
            parse_size(args.shard_size),
            args.val_fraction,
            args.seed,
            progress=bar.update,
            on_total=set_total,
            max_unreadable_fraction=args.max_unreadable_fraction,
        )
    for split, entry in packed.index["splits"].items():
        print(f"{split}: {entry['count']} images in {len(entry['shards'])} shard(s)")
    if packed.skipped:
        print(
            f"left out {packed.skipped} unreadable file(s), each listed in {packed.skipped_listing}"
        )
    print(f"wrote {args.out}; train with --data {args.out}")
    return 0
