"""Pilots of a recipe's levers run side by side: every arm trains at the same time, each on
its share of the cores, so a change in the host's speed (on the 2-core hosts of this project
the hybrid recipe has stepped at 263 and at 453 images/s on different days, and a pilot run
twice the same day at 386 and 430) falls on every arm alike, where arms run one after another
would each meet their own.

    python benchmarks/paired_pilots.py cifar10_hybrid_bf16 --minutes 12 \\
        --arm "recipe=" --arm "resize=--resize-start 0.75" [--seed 0] [--out DIR]

Each arm is ``vitkit train --config benchmarks/recipes/RECIPE.toml`` on the recipe's data
(MNIST and CIFAR-10 from ``$VITKIT_DATA``) with ``--max-minutes MINUTES --seed SEED`` and then
the arm's own flags, in a process of its own with ``cores / arms`` threads (at least one). The
table gives each arm's steps, training images/s, best validation accuracy (what a pilot is
judged by) and test accuracy (reported, not for choosing), and the minutes of wall clock;
then each arm's validation curve.
An arm on its share of the cores steps more slowly than alone on all of them, so ``--minutes``
buys fewer steps than the same budget alone would; operators that scale unevenly with threads
can shift the arms' relative speed a little from what it would be alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import cpu_name, markdown_table
from train_recipes import FROM_SCRATCH, RECIPES, data_folder, data_path, print_curve


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"an arm is NAME=FLAGS (FLAGS may be empty, as in 'recipe='), got {text!r}"
        )
    return name.strip(), shlex.split(flags)


def launch(
    recipe: str, minutes: float, seed: int, arm: tuple[str, list[str]], threads: int, out: Path
) -> subprocess.Popen[bytes]:
    name, flags = arm
    command = [sys.executable, "-m", "vitkit", "train", "--config", str(RECIPES / f"{recipe}.toml")]
    folder = data_folder(recipe)
    if folder is not None:
        command += ["--data", data_path(folder)]
    command += ["--max-minutes", str(minutes), "--seed", str(seed), "--out", str(out / name)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = (out / f"{name}.log").open("wb")
    return subprocess.Popen([*command, *flags], env=env, stdout=log, stderr=subprocess.STDOUT)


def row(name: str, flags: list[str], run_folder: Path) -> list[str]:
    summary = json.loads((run_folder / "summary.json").read_text())
    best = summary["best_val_accuracy"]
    return [
        name,
        shlex.join(flags) or "(the recipe)",
        f"{summary['steps']:,}",
        f"{summary['images_per_second']:.0f}",
        "-" if best is None else f"{best:.2%}",
        f"{summary['test_accuracy']:.2%}",
        f"{summary['wall_seconds'] / 60:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=FROM_SCRATCH)
    parser.add_argument(
        "--arm",
        type=parse_arm,
        action="append",
        required=True,
        help="NAME=FLAGS, vitkit train flags added to the recipe (repeat: one per arm)",
    )
    parser.add_argument("--minutes", type=float, required=True, help="each arm's --max-minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the run folders go (default: a temp dir)")
    args = parser.parse_args()
    names = [name for name, _ in args.arm]
    if len(set(names)) != len(names):
        parser.error(f"arm names must differ, got {names}")
    out = args.out or Path(tempfile.mkdtemp(prefix="vitkit-pilots-"))
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(args.arm))
    processes = [
        launch(args.recipe, args.minutes, args.seed, arm, threads, out) for arm in args.arm
    ]
    failed = [name for name, p in zip(names, processes, strict=True) if p.wait() != 0]
    if failed:
        sys.exit(
            f"arm(s) {', '.join(failed)} failed: see {', '.join(f'{out}/{n}.log' for n in failed)}"
        )
    print(
        f"{cpu_name()}, {os.cpu_count()} cores, {len(args.arm)} arms of {threads} thread(s) at "
        f"once, torch {torch.__version__}; {args.recipe}, {args.minutes:g} minutes, seed "
        f"{args.seed}; run folders in {out}\n"
    )
    header = ["arm", "flags", "steps", "images/s", "best val", "test", "minutes"]
    rows = [row(name, flags, out / name) for name, flags in args.arm]
    print(markdown_table(header, rows))
    for name in names:
        print()
        print_curve(out / name)


if __name__ == "__main__":
    main()
