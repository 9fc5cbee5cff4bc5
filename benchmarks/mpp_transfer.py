"""Does masked patch prediction help, in small? The issue-11 experiment on CIFAR-10
(``vitkit.experiments.mpp_transfer`` runs it; this script names the machine and prints).

MPP pre-training for ``--minutes``, few-shot accuracy of the frozen features against random
initialisation and supervised training for the same minutes, then fine-tuning with 1%, 10% and
100% of the labels for ``--finetune-minutes`` against training from scratch for the same total
time. Every run is time-boxed by the training loop (``max_minutes``), so it fills its minutes
whatever the machine. Prints markdown tables with the machine and the minutes, writes
``mpp_transfer.png`` and ``results.json`` to ``--out``. At the default budgets the eight runs
take about six hours; killed, the study continues where it stopped when run again with the
same arguments. Quick check of the script (not a result): ``--data digits --model vit_digits
--subset 400 --minutes 0.05 --finetune-minutes 0.05 --out /tmp/mpp-check``.

Usage: python benchmarks/mpp_transfer.py [--minutes 60] [--finetune-minutes 10]
       [--out runs/mpp-transfer-cifar10]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from _common import machine_name, markdown_table

from vitkit.experiments.mpp_transfer import (
    FIGURE_FILE,
    SHOTS,
    MppTransferStudy,
    run_mpp_transfer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("VITKIT_DATA", "../shared/data")) / "cifar10-jpg"
    parser.add_argument(
        "--data",
        default=str(default_data),
        help="labelled data (default: $VITKIT_DATA/cifar10-jpg)",
    )
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument("--minutes", type=float, default=60.0, help="MPP pre-training budget")
    parser.add_argument(
        "--finetune-minutes",
        type=float,
        default=10.0,
        help="fine-tuning budget per label fraction",
    )
    parser.add_argument("--finetune-lr", type=float, default=0.03)
    parser.add_argument("--subset", type=int, help="only this many training images (a check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/mpp-transfer-cifar10"),
        help="run folders and results; run again with the same folder to continue",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        study = MppTransferStudy(
            data=args.data,
            out=args.out,
            model=args.model,
            minutes=args.minutes,
            finetune_minutes=args.finetune_minutes,
            finetune_lr=args.finetune_lr,
            subset=args.subset,
            seed=args.seed,
            machine=machine_name(),
        )
        study.claim()  # refuses an --out that holds another study, before any training
    except ValueError as err:
        sys.exit(str(err))
    results = run_mpp_transfer(study)

    mpp = results["mpp"]
    print(
        f"\n{results['machine']}, torch {torch.__version__}; {args.model} on {args.data} "
        f"({results['train_images']} training images); MPP pre-training {args.minutes:g} min "
        f"({mpp['epochs']} epochs, test MPP loss {mpp['test_loss']:.3f}); run folders in "
        f"{study.out}\n"
    )
    print(
        markdown_table(
            ["features", *(f"{s}-shot" for s in SHOTS)],
            [
                [name, *(f"{r[str(s)]['mean']:.2%} ± {r[str(s)]['std']:.2%}" for s in SHOTS)]
                for name, r in results["fewshot"].items()
            ],
        )
    )
    print()
    header = ["labels", "MPP + fine-tune", "scratch (same total minutes)"]
    print(
        markdown_table(
            [*header, "minutes (MPP + ft / scratch)"],
            [
                [
                    f"{r['fraction']:.0%} ({r['images']})",
                    f"{r['mpp']['test_accuracy']:.2%}",
                    f"{r['scratch']['test_accuracy']:.2%}",
                    f"{mpp['minutes']:.1f} + {r['mpp']['minutes']:.1f} / "
                    f"{r['scratch']['minutes']:.1f}",
                ]
                for r in results["finetune"]
            ],
        )
    )
    print(f"\nfigure: {study.out / FIGURE_FILE}")


if __name__ == "__main__":
    main()
