"""``vitkit predict``: the top-k classes of image files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitkit.cli.evaluate import add_compile_flag, add_inference_flags
from vitkit.data.folders import expand_folder
from vitkit.deploy import load_for_inference
from vitkit.evaluation.inference import predict


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="top-k classes of images",
        description="Print the top-k class names and probabilities of each image, read and "
        "preprocessed by the model's evaluation preprocessing exactly as `vitkit eval` reads an "
        "image folder (docs/preprocessing.md). A folder stands for every image file under it "
        "(by suffix, sub-folders included, sorted). A file that cannot be read is reported and "
        "skipped; the exit status is then 2.",
    )
    p.add_argument(
        "checkpoint", help="any checkpoint load_pretrained reads, or a run folder (its best)"
    )
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="image files Pillow reads, or folders of them",
    )
    p.add_argument("--top-k", type=int, default=5, help="how many classes to show (default: 5)")
    add_inference_flags(p)
    add_compile_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    images = [image for path in args.images for image in expand_folder(path)]
    model, _ = load_for_inference(args.checkpoint, args.model, args.device, compiled=args.compile)
    failed = 0
    for path in images:
        try:
            (top,) = predict(model, path, args.top_k)
        except (FileNotFoundError, ValueError) as err:  # a missing or unreadable file
            print(f"vitkit predict: error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    if failed and len(images) > 1:
        print(
            f"vitkit predict: error: {failed} of {len(images)} images could not be read",
            file=sys.stderr,
        )
    return 2 if failed else 0  # bad input, as main's other errors
