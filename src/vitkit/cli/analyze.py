"""``vitkit analyze``: the paper's analyses of a checkpoint as figures and an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkit.analysis import analyze
from vitkit.analysis.report import MAX_SHOWN_FILES
from vitkit.cli.evaluate import add_unreadable_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="attention maps, rollout, attention distance, embeddings: PNGs + report.html",
        description="Write PNG figures and report.html (open it from the file system) with "
        "the paper's analyses of a checkpoint: attention maps per layer and head, attention "
        "rollout, mean attention distance, position-embedding similarity and embedding "
        "filters; for a run folder also its training curves and confusion matrix. Without "
        "--images, samples of --data (or of the run's data) are used.",
    )
    p.add_argument("checkpoint", help="a run folder (vitkit train --out), or any checkpoint")
    p.add_argument(
        "--images",
        nargs="+",
        metavar="IMG",
        help="image files to analyse, or folders of them (every image file under a folder, "
        "sorted; read only until enough are in hand; unreadable ones skipped, as for --data)",
    )
    p.add_argument(
        "--data",
        help="dataset to take sample images from when --images is not given: 'digits' or a "
        "path vitkit reads, a folder of images without class folders as --images reads it "
        "(default: the run's data)",
    )
    add_unreadable_flag(p)
    p.add_argument("--out", required=True, help="folder for the figures and report.html")
    p.add_argument(
        "--num-images",
        type=int,
        help="images shown with attention maps and rollout (default: every --images file up "
        f"to {MAX_SHOWN_FILES}, else 4 samples)",
    )
    p.add_argument(
        "--distance-images",
        type=int,
        default=32,
        help="images averaged for the mean attention distance (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: give a folder (it is created if needed)")
    report = analyze(
        args.checkpoint,
        args.out,
        images=args.images,
        data=args.data,
        num_images=args.num_images,
        distance_images=args.distance_images,
        max_unreadable_fraction=args.max_unreadable_fraction,
    )
    print(f"wrote {report}")
    return 0
