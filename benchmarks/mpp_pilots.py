"""Why masked patch prediction does or does not help: pilots on the masking rate, the target and
the length of pre-training (``vitkit.experiments.mpp_pilots`` runs them; this script names the
machine and prints).

Each pilot pre-trains by MPP for ``--epochs`` (times its length) and is scored by few-shot
linear accuracy of its frozen [class] token and patch tokens' mean, and by fine-tuning on
``--label-fraction`` of the labels for ``--finetune-epochs``; the baselines are the random
initialisation scored the same ways and supervised training from scratch for the fine-tuning's
epochs. Prints a markdown table with the machine; writes ``results.json`` to ``--out`` after
every pilot. Killed, the pilots continue where they stopped when run again with the same
arguments. Quick check of the script (not a result): ``--data digits --model vit_digits
--subset 300 --epochs 1 --finetune-epochs 1 --out /tmp/pilots-check``.

Usage: python benchmarks/mpp_pilots.py [--epochs 10] [--pilots paper "4x longer" ...]
       [--precision bf16] [--out runs/mpp-pilots-cifar10]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from _common import machine_name, markdown_table

from vitkit.experiments.mpp_pilots import (
    PILOTS,
    SHOTS,
    MppPilotStudy,
    run_mpp_pilots,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("VITKIT_DATA", "../shared/data")) / "cifar10-jpg"
    parser.add_argument(
        "--data", default=str(default_data), help="default: $VITKIT_DATA/cifar10-jpg"
    )
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument(
        "--epochs", type=int, default=10, help="MPP pre-training epochs of a pilot of length 1"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="MPP pre-training batch")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--finetune-lr", type=float, default=0.03)
    parser.add_argument(
        "--pilots",
        nargs="+",
        default=[p.name for p in PILOTS],
        metavar="NAME",
        # argparse formats help with %: the "15%" of a pilot's name is doubled
        help=f"which pilots, of {[p.name for p in PILOTS]}".replace("%", "%%"),
    )
    parser.add_argument("--subset", type=int, help="only this many training images (a check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/mpp-pilots-cifar10"),
        help="run folders and results; run again with the same folder to continue",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        study = MppPilotStudy(
            data=args.data,
            out=args.out,
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            precision=args.precision,
            label_fraction=args.label_fraction,
            finetune_epochs=args.finetune_epochs,
            finetune_lr=args.finetune_lr,
            pilots=tuple(args.pilots),
            subset=args.subset,
            seed=args.seed,
            machine=machine_name(),
        )
        study.claim()  # refuses an --out that holds other pilots' runs, before any training
    except ValueError as err:
        sys.exit(str(err))
    results = run_mpp_pilots(study)

    print(
        f"\n{study.machine}, torch {torch.__version__}, {args.precision}; {args.model} on "
        f"{args.data} ({results['train_images']} training images, "
        f"{results['labelled_images']} labelled); MPP batch {args.batch_size}; fine-tuning "
        f"{args.finetune_epochs} epochs; run folders in {study.out}\n"
    )
    header = ["", "MPP epochs", "MPP test loss", "patch-colour accuracy"]
    fewshot_header = [
        f"{shots}-shot {pooling}" for pooling in ("class token", "patch mean") for shots in SHOTS
    ]
    rows = []
    for name, row in results["rows"].items():
        mpp = row.get("mpp")
        found = row.get("fewshot", {})
        rows.append(
            [
                name,
                f"{mpp['epochs']:g}" if mpp else "-",
                f"{mpp['test_loss']:.3f}" if mpp else "-",
                f"{mpp['test_accuracy']:.1%}" if mpp and mpp["test_accuracy"] else "-",
                *(
                    f"{found[pooling][str(shots)]['mean']:.1%}" if pooling in found else "-"
                    for pooling in ("class token", "patch mean")
                    for shots in SHOTS
                ),
                f"{row['finetune']['test_accuracy']:.2%}",
            ]
        )
    tuned = f"{args.label_fraction:.0%} labels, fine-tuned"
    print(markdown_table([*header, *fewshot_header, tuned], rows))


if __name__ == "__main__":
    main()
