"""Is loading the bottleneck? Images/s of the data pipeline against the training step it feeds.

Rows (median of --runs runs each, all measured in this run):
  (a) decoding the CIFAR-10 JPEG train folder (50,000 images): cold (no decoded cache; the
      files themselves may sit in the OS page cache) and from the decoded cache;
  (b) one epoch's batches (``iterate_batches``) through ``BatchTransform``: evaluation (resize
      and scale) and training (random-resized crop, flip, RandAugment(2, 15), mixup 0.8 /
      cutmix 1.0, label smoothing 0.1);
  (c) the training step it feeds: vit_micro (32px, 10 classes) forward + backward + AdamW.

Usage: VITKIT_DATA=/path/to/shared/data python benchmarks/data.py [--runs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vitkit.data import AugmentConfig, BatchTransform, iterate_batches, load_dataset
from vitkit.models import create_model

TRAIN_AUGMENT = AugmentConfig(
    random_resized_crop=True,
    hflip=True,
    randaugment=(2, 15),
    mixup=0.8,
    cutmix=1.0,
    label_smoothing=0.1,
)


def median_seconds(work: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="batches per timed run in (b), (c)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(os.environ.get("VITKIT_DATA", ""))
    folder = data / "cifar10-jpg"
    if not os.environ.get("VITKIT_DATA") or not folder.is_dir():
        print("set VITKIT_DATA to the shared data folder (with cifar10-jpg/) to run this benchmark")
        return 2
    rows: list[tuple[str, int, float]] = []

    with tempfile.TemporaryDirectory() as cache:
        os.environ["VITKIT_CACHE"] = "off"
        cold = median_seconds(lambda: load_dataset(folder, "train"), args.runs)
        os.environ["VITKIT_CACHE"] = cache
        dataset = load_dataset(folder, "train")  # fills the cache
        cached = median_seconds(lambda: load_dataset(folder, "train"), args.runs)
    rows += [("(a) decode CIFAR-10 train JPEGs, cold", len(dataset), cold)]
    rows += [("(a) decode CIFAR-10 train JPEGs, cached", len(dataset), cached)]

    batch, steps = args.batch_size, args.steps
    for name, train in (("eval (resize + scale)", False), ("train augmentations", True)):
        transform = BatchTransform((32, 32), len(dataset.classes), TRAIN_AUGMENT, seed=0)

        def transform_batches(transform: BatchTransform = transform, train: bool = train) -> None:
            batches = iterate_batches(dataset, batch, shuffle=True, seed=0, epoch=0)
            for _, (images, labels) in zip(range(steps), batches, strict=False):
                transform(images, labels, train=train)

        rows.append((f"(b) batches + BatchTransform, {name}", batch * steps,
                     median_seconds(transform_batches, args.runs)))  # fmt: skip

    model = create_model("vit_micro", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transform = BatchTransform((32, 32), 10, TRAIN_AUGMENT, seed=0)
    images, targets = transform(dataset.images[:batch], dataset.labels[:batch], train=True)

    def train_steps() -> None:
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train_steps()  # warm-up
    rows.append(("(c) vit_micro training step (fwd + bwd + AdamW)", batch * steps,
                 median_seconds(train_steps, args.runs)))  # fmt: skip

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, "
          f"median of {args.runs} runs")  # fmt: skip
    print(f"| {'stage':<52} | {'images':>7} | {'seconds':>8} | {'images/s':>9} |")
    print(f"|{'-' * 54}|{'-' * 8}:|{'-' * 9}:|{'-' * 10}:|")
    for name, count, seconds in rows:
        print(f"| {name:<52} | {count:>7} | {seconds:>8.3f} | {count / seconds:>9.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
