"""int8 against fp32: top-1 agreement, accuracies and speed of a checkpoint's int8 export.

The checkpoint is exported as ``vitkit export --to int8`` does (torchao dynamic int8 linear
layers, saved to a temporary ``.safetensors`` and read back, so the file a user deploys is what
is measured), then both models classify the same test images. Issue 13's bar: >= 99% of top-1
predictions agree on the CIFAR-10 test set. Speed is images/s of the two models' forward passes
over the whole set, alternated batch by batch.

Usage: python benchmarks/int8_agreement.py CKPT [--data $VITKIT_DATA/cifar10-jpg]
       [--split test] [--batch-size 256] [--threads 2] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import cpu_name, markdown_table

from vitkit.checkpoints import load_pretrained
from vitkit.data import iterate_batches, load_dataset
from vitkit.deploy import load_int8, quantize_int8, save_int8
from vitkit.evaluation.inference import eval_transform

BAR = 0.99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="any checkpoint load_pretrained reads")
    parser.add_argument("--data", help="dataset (default: $VITKIT_DATA/cifar10-jpg)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--limit", type=int, help="only the first N images (a quick check)")
    args = parser.parse_args()
    data = args.data or str(Path(os.environ.get("VITKIT_DATA", "")) / "cifar10-jpg")
    if not Path(data).exists():
        parser.error(f"no dataset at {data}: pass --data or set VITKIT_DATA=../shared/data")
    torch.set_num_threads(args.threads)
    dataset = load_dataset(data, args.split)
    if args.limit:
        dataset = dataset.subset(torch.arange(min(args.limit, len(dataset))))
    model = load_pretrained(args.checkpoint).eval()
    with tempfile.TemporaryDirectory() as tmp:
        int8 = load_int8(save_int8(quantize_int8(model), Path(tmp) / "int8.safetensors"))
    transform = eval_transform(model)
    models = {"fp32": model, "int8": int8}
    seconds = dict.fromkeys(models, 0.0)
    correct = dict.fromkeys(models, 0)
    agree = 0
    with torch.inference_mode():
        for images, labels in iterate_batches(
            dataset, args.batch_size, shuffle=False, seed=0, epoch=0
        ):
            x, _ = transform(images, labels, train=False)
            predictions = {}
            for key, net in models.items():
                start = time.perf_counter()
                predictions[key] = net(x).argmax(-1)
                seconds[key] += time.perf_counter() - start
                correct[key] += int((predictions[key] == labels).sum())
            agree += int((predictions["fp32"] == predictions["int8"]).sum())
    n = len(dataset)
    print(
        f"{args.checkpoint} on {data} ({args.split}, {n} images); {cpu_name()}, "
        f"{args.threads} threads; torch {torch.__version__}"
    )
    rows = [[key, f"{correct[key] / n:.4f}", f"{n / seconds[key]:.1f}"] for key in models]
    print(markdown_table(["weights", "accuracy", "images/s"], rows))
    verdict = "meets" if agree / n >= BAR else "misses"
    print(f"top-1 agreement int8 vs fp32: {agree / n:.4f} ({agree}/{n}); {verdict} the bar {BAR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
