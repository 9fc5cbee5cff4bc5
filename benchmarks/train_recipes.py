"""Training recipes, end to end: the test accuracy each reaches and the wall time it takes.

Each recipe is a TOML file in ``benchmarks/recipes/`` (the same file ``vitkit train --config``
reads), so the numbers in the README come from exactly the command it shows:

    digits    the main job (``vitkit train`` with no options)
    mnist     MNIST from scratch, fp32
    mnist_bf16  MNIST under bf16 autocast, the schedule fitted to 8 minutes of training
    cifar10   CIFAR-10 (JPEG copy) from scratch with the plain ViT, fp32, within 60 minutes
    cifar10_bf16  the plain ViT under bf16 autocast, fitted to 55 minutes, flip TTA
    cifar10_hybrid  the small hybrid (ResNet stem and stage, then the encoder), fp32
    cifar10_hybrid_bf16  the hybrid with 4 blocks, bf16, Muon, RandAugment, drop-path, 55 min, flip TTA
    cifar10_hybrid_fp32  the same in fp32 (CPUs without native bf16), from 16 px, 54 min,
              the test split scored with flips and translations
    finetune  pre-train on MNIST at 8x8, fine-tune on the digits at 16x16, against the same
              model trained from scratch on the digits at 16x16 for as many steps

MNIST and CIFAR-10 come from ``$VITKIT_DATA`` (``mnist/``, ``cifar10-jpg/``). The table gives
the hardware; ``--seeds 0 1 2`` repeats a recipe with other seeds and adds the mean, the
standard deviation and the range of the test accuracy and of the wall time.

Usage: python benchmarks/train_recipes.py RECIPE [--seeds 0] [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_name

from vitkit.training import TrainConfig, resolve_config, train
from vitkit.training.config import read_config_file
from vitkit.utils.config import merge_tables

RECIPES = Path(__file__).with_name("recipes")
# Every recipe file names its model; cifar10_scaling.toml holds an experiment's shared settings.
FROM_SCRATCH = sorted(p.stem for p in RECIPES.glob("*.toml") if "model" in read_config_file(p))


def data_folder(recipe: str) -> str | None:
    """The recipe's folder under ``$VITKIT_DATA``; None for the shipped digits."""
    if recipe.startswith("cifar10"):
        return "cifar10-jpg"
    return "mnist" if recipe.startswith("mnist") else None


def data_path(name: str) -> str:
    root = os.environ.get("VITKIT_DATA")
    if not root or not (Path(root) / name).is_dir():
        sys.exit(f"this recipe needs $VITKIT_DATA/{name} (set VITKIT_DATA=../shared/data)")
    return str(Path(root) / name)


def run(values: dict[str, Any], out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    presets = values.pop("presets", [])
    flags = merge_tables(TrainConfig, values, {"run": {"out": str(out)}})
    summary = train(resolve_config(presets, flags=flags))
    return {**summary, "wall_seconds": time.perf_counter() - started}


def recipe_values(name: str, seed: int, epochs: int | None) -> dict[str, Any]:
    values = merge_tables(
        TrainConfig, read_config_file(RECIPES / f"{name}.toml"), {"run": {"seed": seed}}
    )
    folder = data_folder(name)
    if folder is not None:
        values = merge_tables(TrainConfig, values, {"data": {"source": data_path(folder)}})
    if epochs is not None:
        warmup = min(values.get("schedule", {}).get("warmup_epochs", 3.0), epochs / 2)
        schedule = {"epochs": epochs, "warmup_epochs": warmup}
        values = merge_tables(TrainConfig, values, {"schedule": schedule})
    return values


def from_scratch(name: str, seeds: list[int], epochs: int | None, out: Path) -> list[list[str]]:
    rows = []
    for seed in seeds:
        summary = run(recipe_values(name, seed, epochs), out / f"{name}-seed{seed}")
        rows.append(
            [
                name,
                str(seed),
                f"{summary['test_accuracy']:.2%}",
                f"{summary['wall_seconds'] / 60:.2f}",
                f"{summary['images_per_second']:.0f}",
            ]
        )
        print_curve(out / f"{name}-seed{seed}")
    return rows


def print_curve(run_dir: Path) -> None:
    """The validation accuracy after each evaluation (nothing for a recipe without a val split)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if r["split"] == "val"]
    if curve:
        print(f"{run_dir.name}: epoch  val accuracy")
        for record in curve:
            print(f"{record['epoch']:>5}  {record['accuracy']:.4f}")


def finetune(seeds: list[int], epochs: int | None, out: Path) -> list[list[str]]:
    """MNIST at 8x8 (the digits' resolution) -> digits at 16x16, against scratch at 16x16."""
    rows = []
    pre_epochs, tune_epochs = epochs or 3, epochs or 40
    for seed in seeds:
        pre_dir = out / f"pretrain-seed{seed}"
        pre = run(
            {
                "model": {"name": "vit_digits"},
                "data": {"source": data_path("mnist"), "val_fraction": 0.05},
                "optim": {"batch_size": 256},
                "schedule": {"epochs": pre_epochs, "warmup_epochs": pre_epochs / 4},
                "run": {"seed": seed},
            },
            pre_dir,
        )
        schedule_16 = {"epochs": tune_epochs, "warmup_epochs": tune_epochs / 20}
        digits_16 = {"data": {"source": "digits"}, "schedule": schedule_16, "run": {"seed": seed}}
        tuned = run(
            {
                **digits_16,
                "presets": ["finetune"],
                "optim": {"lr": 0.03},
                "model": {"img_size": 16, "init_from": str(pre_dir / "best.safetensors")},
            },
            out / f"finetune-seed{seed}",
        )
        scratch = run({**digits_16, "model": {"img_size": 16}}, out / f"scratch-seed{seed}")
        for label, s in (
            ("pre-train: MNIST 8x8", pre),
            ("fine-tune: digits 16x16", tuned),
            ("scratch: digits 16x16", scratch),
        ):
            rows.append(
                [
                    label,
                    str(seed),
                    f"{s['test_accuracy']:.2%}",
                    f"{s['wall_seconds'] / 60:.1f}",
                    f"{s['images_per_second']:.0f}",
                ]
            )
    return rows


def print_table(rows: list[list[str]]) -> None:
    header = ["recipe", "seed", "test accuracy", "minutes", "train images/s"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=(*FROM_SCRATCH, "finetune"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs (a quick check)")
    parser.add_argument("--out", type=Path, help="where the run folders go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vitkit-recipes-"))
    if args.recipe == "finetune":
        rows = finetune(args.seeds, args.epochs, out)
    else:
        rows = from_scratch(args.recipe, args.seeds, args.epochs, out)
    print(f"\n{machine_name()}, torch {torch.__version__}; run folders in {out}")
    print_table(rows)
    if len(args.seeds) > 1 and args.recipe != "finetune":
        for what, column, unit in (("test accuracy", 2, "%"), ("minutes", 3, "")):
            values = [float(r[column].rstrip("%")) for r in rows]
            print(
                f"{what} over {len(values)} seeds: mean {statistics.mean(values):.2f}{unit}, "
                f"standard deviation {statistics.stdev(values):.2f}, "
                f"range {min(values):.2f}-{max(values):.2f}{unit}"
            )


if __name__ == "__main__":
    main()
