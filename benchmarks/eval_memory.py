"""Peak memory of ``vitkit probe`` on a folder of phone photos, as the folder grows (issue 23,
item 2): the features are computed batch by batch from the streamed folder, so the peak
should stay flat and under 2 GB whatever the number of photos.

For each N this writes a photo folder with ``train/`` and ``test/`` subfolders of N photos
each (``make_photo_folder.py``: big JPEGs, EXIF rotations, CMYK, PNG modes and, per class,
one empty, one truncated and one text file), saves ``vitkit.create_model("vit_ti16",
img_size=96, num_classes=2)`` with ``save_pretrained``, and runs ``vitkit probe`` on it in a
fresh Python process, which reports its own peak resident set size (``ru_maxrss``, PyTorch
included) and the largest peak of its loader workers. The lead measures on a quiet machine.

Usage: python benchmarks/eval_memory.py [--photos 60 240] [--classes 2] [--method linear]
       [--tools /work/shared/tools] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import cpu_name, markdown_table

GOAL_BYTES = 2 * 1024**3


def measure(argv: list[str]) -> None:
    """In this (fresh) process: run the command, print its peak RSS and its workers'."""
    from vitkit.cli import main

    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            code = main(argv)
        finally:
            sys.stdout = stdout
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"code": code, "peak": own, "workers": workers}))


def photo_folder(root: Path, photos: int, classes: int, tools: Path) -> Path:
    for split, seed in (("train", 0), ("test", 1)):
        subprocess.run(
            [
                sys.executable,
                str(tools / "make_photo_folder.py"),
                str(root / split),
                "--per-class",
                str(photos // classes),
                "--classes",
                str(classes),
                "--seed",
                str(seed),
            ],
            check=True,
        )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--photos",
        type=int,
        nargs="+",
        default=[60, 240],
        help="photos in train/ (and as many in test/) (default: 60 240)",
    )
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--method", choices=("linear", "knn"), default="linear")
    parser.add_argument("--tools", type=Path, default=Path("/work/shared/tools"))
    parser.add_argument("--keep", type=Path, help="write the folders here and keep them")
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    import vitkit

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        checkpoint = vitkit.create_model("vit_ti16", img_size=96, num_classes=args.classes)
        checkpoint_path = checkpoint.save_pretrained(work / "vit_ti16_96")
        rows = []
        for photos in args.photos:
            folder = photo_folder(work / f"photos_{photos}", photos, args.classes, args.tools)
            command = [
                "probe",
                str(checkpoint_path),
                "--data",
                str(folder),
                "--method",
                args.method,
                "--device",
                "cpu",
                "--json",
            ]
            result = subprocess.run(
                [sys.executable, __file__, "--measure", *command],
                check=True,
                capture_output=True,
                text=True,
            )
            report = json.loads(result.stdout.strip().splitlines()[-1])
            peak, workers = report["peak"], report["workers"]
            rows.append(
                [
                    str(photos),
                    str(photos),
                    f"{peak / 1024**3:.2f}",
                    f"{workers / 1024**3:.2f}",
                    "yes" if peak < GOAL_BYTES and report["code"] == 0 else "NO",
                ]
            )
    print(
        f"vitkit probe --method {args.method}, vit_ti16 at 96 px, {args.classes} classes; "
        f"CPU: {cpu_name()}"
    )
    header = ["train photos", "test photos", "peak RSS (GB)", "largest worker (GB)", "< 2 GB"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
