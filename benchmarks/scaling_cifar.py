"""ViT against ResNets on CIFAR-10 (issue 12, item 5): the paper's data-size comparison in small.

Trains the plain ViT (``vit_cifar``), the small hybrid (``vit_cifar_hybrid``) and a small BiT
ResNet-v2 of similar compute (``resnetv2_cifar``; 0.25-0.28 GFLOPs per image each) on 10%, 30%
and 100% of the CIFAR-10 training set (stratified; the same 10,000 test images) through
``vitkit experiment scaling``, each run for the same time budget, with the settings of
``benchmarks/recipes/cifar10_scaling.toml`` (``cifar10.toml``'s, model and length aside). Then it measures every model's
inference speed on the same machine and prints two Markdown tables for the README: every run,
and the three models side by side (parameters, GFLOPs per image, training and inference
images/s, test accuracy at each fraction). Killed, it continues where it stopped when run again
with the same arguments.

Usage: python benchmarks/scaling_cifar.py [--budget-minutes 15 | --epochs N]
       [--fractions 0.1 0.3 1.0] [--models vit_cifar vit_cifar_hybrid resnetv2_cifar]
       [--data $VITKIT_DATA/cifar10-jpg] [--out runs/scaling-cifar10] [--threads 2]
Nine runs of 15 minutes take about 2.5 hours with the evaluations.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name, device_sync, markdown_table, timed_calls

from vitkit.analysis.scaling import markdown_table as runs_table
from vitkit.checkpoints import load_pretrained
from vitkit.experiments.scaling import ScalingExperiment, run_scaling
from vitkit.training.config import read_toml

RECIPE = Path(__file__).with_name("recipes") / "cifar10_scaling.toml"
MODELS = ("vit_cifar", "vit_cifar_hybrid", "resnetv2_cifar")


def inference_speed(checkpoint: Path, batch: int = 256, repeats: int = 5) -> float:
    """Images/s of a trained model's forward pass (fp32, ``inference_mode``, median)."""
    model = load_pretrained(checkpoint).eval()
    x = torch.randn(batch, model.cfg.in_chans, *model.cfg.img_size)
    with torch.inference_mode():
        seconds = timed_calls({"f": lambda: model(x)}, 1, repeats, device_sync(x.device))["f"]
    return batch / seconds


def models_table(rows: list[dict[str, Any]], out: Path, fractions: list[float]) -> str:
    header = ["model", "parameters", "GFLOPs/image", "train img/s", "inference img/s"]
    header += [f"accuracy at {f:g}" for f in fractions]
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["fraction"]: r for r in rows if r["model"] == model}
        largest = mine[max(mine)]
        speed = inference_speed(out / "runs" / f"{model}-f{max(mine):g}" / "best.safetensors")
        train_speeds = sorted(r["train_images_per_s"] for r in mine.values())
        lines.append(
            [
                model,
                f"{largest['params']:,}",
                f"{largest['gflops_per_image']:.3f}",
                f"{train_speeds[len(train_speeds) // 2]:,.0f}",
                f"{speed:,.0f}",
                *(f"{mine[f]['test_accuracy']:.1%}" if f in mine else "" for f in fractions),
            ]
        )
    return markdown_table(header, lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--budget-minutes", type=float, default=None)
    length.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--data", default=None, help="default: $VITKIT_DATA/cifar10-jpg")
    parser.add_argument("--out", type=Path, default=Path("runs/scaling-cifar10"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data = args.data
    if data is None:
        root = os.environ.get("VITKIT_DATA")
        if not root or not (Path(root) / "cifar10-jpg").is_dir():
            sys.exit("needs $VITKIT_DATA/cifar10-jpg (set VITKIT_DATA=../shared/data) or --data")
        data = str(Path(root) / "cifar10-jpg")
    budget = (
        args.budget_minutes if args.epochs is None and args.budget_minutes is not None else 15.0
    )
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = read_toml(RECIPE)
    experiment = ScalingExperiment(
        data,
        args.fractions,
        args.models,
        args.out,
        epochs=args.epochs,
        budget_minutes=None if args.epochs is not None else budget,
        base=base,
    )
    rows = run_scaling(experiment)
    length_text = f"{args.epochs} epochs" if args.epochs else f"{budget:g} minutes of training"
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads; {length_text} per run\n")
    print(runs_table(rows))
    print(models_table(rows, args.out, sorted(set(args.fractions))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
