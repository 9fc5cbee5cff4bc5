"""Is loading the bottleneck? Images/s of the data pipeline against the training step it feeds.

Rows (median of --runs runs each, all measured in this run):
  (a) decoding the CIFAR-10 JPEG train folder (50,000 images): cold (no decoded cache; the
      files themselves may sit in the OS page cache) and from the decoded cache;
  (b) one epoch's batches (``iterate_batches``) through ``BatchTransform``: evaluation (resize
      and scale) and training (random-resized crop, flip, RandAugment(2, 15), mixup 0.8 /
      cutmix 1.0, label smoothing 0.1);
  (c) the training step it feeds: vit_micro (32px, 10 classes) forward + backward + AdamW.

Usage: VITKIT_DATA=/path/to/shared/data python benchmarks/data.py [--runs 3] [--threads N]

With ``--streaming``, the streamed sources instead (issue 10), at ``--img-size`` (224) with the
training crop (random-resized, from the original image):
  (d) images/s of ``train_batches`` over a folder of phone-size JPEGs (made by
      ../shared/tools/make_photo_folder.py: 4032x3024 and smaller, EXIF-rotated, CMYK, grey,
      PNG, broken files), the 224 px Imagenette train folder and shards packed from it, with
      0, 1 and 2 loader workers (loader start-up included, as once per epoch);
  (e) the training step they feed: vit_ti16 and vit_s16 at 224 px, batch 32 (fp32);
  (f) peak memory (max RSS of the training process, and of its largest loader worker) of a
      1-epoch ``vitkit train`` run on 100 and on 1,000 phone photos, each in a fresh process.

Usage: VITKIT_DATA=... python benchmarks/data.py --streaming [--photos 200] [--images 2048]
       [--stream-batches 16] [--batch 32] [--rss-photos 100 1000] [--rss-model vit_ti16]
       [--step-models vit_ti16 vit_s16] [--img-size 224] [--runs 3] [--photo-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_step import training_step

from vitkit.data import AugmentConfig, BatchTransform, iterate_batches, load_dataset
from vitkit.data.shards import parse_size, write_shards
from vitkit.data.sources import DataOptions, open_source
from vitkit.models import create_model, model_config
from vitkit.training import TrainConfig
from vitkit.training import train as train_run

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


def print_table(rows: list[tuple[str, int, float]], note: str) -> None:
    print(note)
    print(f"| {'stage':<52} | {'images':>7} | {'seconds':>8} | {'images/s':>9} |")
    print(f"|{'-' * 54}|{'-' * 8}:|{'-' * 9}:|{'-' * 10}:|")
    for name, count, seconds in rows:
        print(f"| {name:<52} | {count:>7} | {seconds:>8.3f} | {count / seconds:>9.0f} |")


def photo_tool() -> Path:
    """``make_photo_folder.py`` of the shared folder: ``$VITKIT_DATA/../tools``."""
    return Path(os.environ.get("VITKIT_DATA", "")).parent / "tools/make_photo_folder.py"


def make_photos(out: Path, count: int) -> Path:
    """``count`` phone photos in ``out``; a folder already there (``--photo-cache``) is reused."""
    if out.is_dir() and any(out.iterdir()):
        return out
    subprocess.run(
        [
            sys.executable,
            str(photo_tool()),
            str(out),
            "--per-class",
            str(count // 2),
            "--classes",
            "2",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def rss_case(folder: str, args: argparse.Namespace) -> None:
    """One fresh process: a 1-epoch run on ``folder``; prints its peak memory as JSON."""
    with tempfile.TemporaryDirectory() as out:
        train_run(
            TrainConfig.from_dict(
                dict(
                    data=folder,
                    model=args.rss_model,
                    img_size=args.img_size,
                    epochs=1,
                    batch_size=args.batch,
                    warmup_epochs=0.0,
                    data_in_memory="no",
                    out=f"{out}/run",
                    # evaluation in training-size batches: the default (512) would make the peak grow
                    # with the test split (up to 512 images) rather than with nothing
                    eval_batch_size=args.batch,
                )
            )
        )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mb": own, "worker_mb": workers}))


def streaming(args: argparse.Namespace, data: Path) -> int:
    size = (args.img_size, args.img_size)
    options = DataOptions("no", 0, AugmentConfig(random_resized_crop=True))
    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.photo_cache or scratch
        imagenette = open_source(str(data / "imagenette2-224"), "train", options)
        imagenette = imagenette.subset(torch.arange(min(args.images, len(imagenette))))
        info = imagenette.info
        write_shards(
            {"train": imagenette},
            Path(scratch, "shards"),
            parse_size("500MB"),
            classes=info.classes or [],
            channels=3,
            source="imagenette",
            held_out_test=False,
        )
        sources = {
            f"{args.photos} phone photos": open_source(
                str(make_photos(Path(tmp, f"photos{args.photos}"), args.photos)), "train", options
            ),
            "Imagenette 224 px folder": imagenette,
            "Imagenette 224 px shards": open_source(str(Path(scratch, "shards")), "train", options),
        }
        for name, source in sources.items():
            source.set_image_size(size)
            batches = min(args.stream_batches, len(source) // args.batch)
            for workers in (0, 1, 2):
                source.num_workers = workers

                def epoch(source: object = source, batches: int = batches) -> None:
                    stream = source.train_batches(args.batch, seed=0, epoch=0)
                    for _ in zip(range(batches), stream, strict=False):
                        pass

                rows.append(
                    (
                        f"(d) {name}, {workers} worker(s)",
                        batches * args.batch,
                        median_seconds(epoch, args.runs),
                    )
                )
        for model_name in args.step_models:
            cfg = model_config(model_name, img_size=args.img_size)
            model = create_model(model_name, img_size=args.img_size)
            x = torch.rand(32, cfg.in_chans, *size) * 2 - 1
            step = training_step(model, model, x, torch.zeros(32, dtype=torch.long), "fp32")
            step()  # warm-up
            rows.append(
                (f"(e) {model_name} training step, batch 32", 32, median_seconds(step, args.runs))
            )
        print_table(
            rows,
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{args.img_size} px, batch {args.batch}, median of {args.runs} runs",
        )
        peak_memory(args, Path(tmp))
    return 0


def peak_memory(args: argparse.Namespace, tmp: Path) -> None:
    """(f): a 1-epoch run on ``--rss-photos`` phone photos each, in a fresh process."""
    print("\n| phone photos | main process peak RSS (MB) | largest worker (MB) |\n|--:|--:|--:|")
    for count in args.rss_photos:
        folder = make_photos(tmp / f"photos{count}", count)
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-case",
                str(folder),
                "--rss-model",
                args.rss_model,
                "--img-size",
                str(args.img_size),
                "--batch",
                str(args.batch),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        peak = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {count} | {peak['main_mb']:.0f} | {peak['worker_mb']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="batches per timed run in (b), (c)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--streaming", action="store_true", help="rows (d)-(f) instead")
    parser.add_argument("--photos", type=int, default=200, help="(d) phone photos")
    parser.add_argument("--images", type=int, default=2048, help="(d) Imagenette images")
    parser.add_argument("--stream-batches", type=int, default=16, help="(d) batches timed")
    parser.add_argument("--batch", type=int, default=32, help="(d), (f) batch size")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--step-models", nargs="*", default=["vit_ti16", "vit_s16"])
    parser.add_argument("--rss-photos", nargs="*", type=int, default=[100, 1000])
    parser.add_argument("--rss-model", default="vit_ti16")
    parser.add_argument(
        "--photo-cache", help="folder for the phone-photo folders (photosN), reused when present"
    )
    parser.add_argument("--rss-only", action="store_true", help="(f) alone")
    parser.add_argument("--rss-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_case:
        rss_case(args.rss_case, args)
        return 0
    if args.rss_only:
        with tempfile.TemporaryDirectory() as scratch:
            peak_memory(args, Path(args.photo_cache or scratch))
        return 0
    data = Path(os.environ.get("VITKIT_DATA", ""))
    if args.streaming:
        if not (data / "imagenette2-224").is_dir() or not photo_tool().is_file():
            print(f"--streaming needs VITKIT_DATA/imagenette2-224 and {photo_tool()}")
            return 2
        return streaming(args, data)
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

        rows.append(
            (
                f"(b) batches + BatchTransform, {name}",
                batch * steps,
                median_seconds(transform_batches, args.runs),
            )
        )

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
    rows.append(
        (
            "(c) vit_micro training step (fwd + bwd + AdamW)",
            batch * steps,
            median_seconds(train_steps, args.runs),
        )
    )

    print_table(
        rows,
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
        f"{batch}, median of {args.runs} runs",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
