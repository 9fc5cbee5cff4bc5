"""``vitkit experiment scaling``: the paper's data-size and compute comparison in small."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkit.analysis.scaling import (
    COMPUTE_FIGURE,
    REPORT_FILE,
    RESULTS_CSV,
    SIZE_FIGURE,
    markdown_table,
)
from vitkit.cli.train import progress_bar
from vitkit.experiments.scaling import ScalingExperiment, run_scaling
from vitkit.training.config import read_config_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment", help="experiments that train many runs (scaling: ViT against ResNets)"
    )
    kinds = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    scaling = kinds.add_parser(
        "scaling",
        help="train every model on every fraction of a training set; table and figures",
        description="Train every model on every stratified fraction of the training split "
        "(same test split), for the same epochs or the same time budget, and write "
        "results.csv / results.md, accuracy against training images and against training "
        "FLOPs (the paper's Figures 3-5), and report.html. Each run is a normal run folder "
        "under OUT/runs/; run the same command again after a kill: finished runs are read "
        "back, an unfinished one is resumed.",
    )
    scaling.add_argument("--data", required=True, help="'digits' or a dataset path")
    scaling.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        required=True,
        metavar="F",
        help="fractions of the training split, in (0, 1]",
    )
    scaling.add_argument(
        "--models", nargs="+", required=True, metavar="MODEL", help="registered models"
    )
    length = scaling.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int, help="train every run for N epochs of its data")
    length.add_argument(
        "--budget-minutes",
        type=float,
        metavar="T",
        help="train every run for T minutes (time in training steps; the schedule is fitted to "
        "the steps that fit into T at the speed measured as the run goes)",
    )
    scaling.add_argument(
        "--config",
        type=Path,
        help="TOML of training settings for every run (batch size, lr, augmentation, seed...; "
        "not model, data, steps or max_minutes, which the experiment sets)",
    )
    scaling.add_argument(
        "--out", type=Path, help="experiment folder (default: runs/scaling-<data name>)"
    )
    scaling.set_defaults(func=run_experiment)


def run_experiment(args: argparse.Namespace) -> int:
    name = "digits" if args.data == "digits" else Path(args.data).name
    experiment = ScalingExperiment(
        data=args.data,
        fractions=args.fractions,
        models=args.models,
        out=args.out or Path("runs") / f"scaling-{name}",
        epochs=args.epochs,
        budget_minutes=args.budget_minutes,
        base=read_config_file(args.config) if args.config is not None else {},
    )
    rows = run_scaling(experiment, progress=progress_bar)
    print(markdown_table(rows), end="")
    out = experiment.out
    print(
        f"table {out / RESULTS_CSV}, figures {out / SIZE_FIGURE} and {out / COMPUTE_FIGURE}, "
        f"report {out / REPORT_FILE}"
    )
    return 0
