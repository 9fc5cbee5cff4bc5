"""Does masked patch prediction help, in small? The issue-11 experiment on CIFAR-10.

1. Pre-train ``vit_cifar`` by masked patch prediction (``vitkit pretrain``'s defaults: 50% of
   the patches corrupted, 3-bit mean colour targets, Adam 2e-4, warm-up, cosine) on the
   training images for ``--minutes`` (the MPP task never reads the labels).
2. Few-shot linear accuracy (10 and 25 shots per class, 3 seeds, the paper's closed-form
   ridge regression on frozen features) of that model, of the same model at random
   initialisation and of it trained with labels for the same minutes.
3. Fine-tune the MPP model with 1%, 10% and 100% of the labels (``vitkit finetune``'s recipe,
   SGD) for ``--finetune-minutes``, against the same model trained from scratch on those
   labels for the same total time: pre-training plus fine-tuning minutes.

Time budgets become epochs through a measured seconds per step of each configuration (a few
steps of the real run, interrupted), so a run fits its minutes whatever the machine. Prints a
markdown table with the machine and the minutes, writes ``mpp_transfer.png`` and
``results.json`` to ``--out``. Quick check of the script (not a result): ``--data digits
--model vit_digits --subset 400 --minutes 0.05 --finetune-minutes 0.05``.

Usage: python benchmarks/mpp_transfer.py [--minutes 60] [--finetune-minutes 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name, markdown_table

from vitkit.checkpoints import load_pretrained
from vitkit.data import ImageDataset, load_dataset
from vitkit.evaluation import extract_features, fewshot_indices, fewshot_protocol
from vitkit.models import create_model
from vitkit.training import (
    FINETUNE_DEFAULTS,
    PRETRAIN_DEFAULTS,
    TrainConfig,
    TrainingInterrupted,
    train,
)

# The supervised recipe of benchmarks/recipes/cifar10.toml, without its data and epochs.
SUPERVISED = dict(batch_size=128, lr=1e-3, augment=dict(random_resized_crop=True,
                  crop_scale=(0.5, 1.0), hflip=True, label_smoothing=0.1))  # fmt: skip
PRETRAIN = dict(PRETRAIN_DEFAULTS, batch_size=128,
                augment=dict(random_resized_crop=True, crop_scale=(0.5, 1.0), hflip=True))  # fmt: skip
LABEL_FRACTIONS = (0.01, 0.1, 1.0)
SHOTS = (10, 25)
CALIBRATION_STEPS = 12


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def save_npz(path: Path, train: ImageDataset, test: ImageDataset) -> str:
    np.savez(path, x_train=train.images.numpy(), y_train=train.labels.numpy(),
             x_test=test.images.numpy(), y_test=test.labels.numpy(),
             classes=np.asarray(train.classes))  # fmt: skip
    return str(path)


def labelled_subset(train: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """``fraction`` of the images, the same number of each class (at least one), drawn as the
    few-shot images are."""
    if fraction >= 1.0:
        return train
    per_class = max(1, round(fraction * len(train) / len(train.classes)))
    chosen = fewshot_indices(train.labels, per_class, seed, len(train.classes))
    return train.subset(torch.from_numpy(np.sort(chosen)))


def seconds_per_step(values: dict[str, Any], out: Path) -> float:
    """Seconds per optimizer step of the run ``values`` describes, from a few of its steps
    (the first two, which warm up, left out)."""
    stamps = [time.perf_counter()]

    def progress(step: int, total: int, record: dict[str, Any] | None) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) > CALIBRATION_STEPS or step == total:
            raise KeyboardInterrupt

    cfg = TrainConfig.from_dict({**values, "evaluators": [], "out": str(out)})
    with contextlib.suppress(TrainingInterrupted):
        train(cfg, progress=progress)
    first = 2 if len(stamps) > 3 else 0  # too few steps: the start-up counts too (longer)
    return (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)


def budgeted(values: dict[str, Any], minutes: float, train_size: int, out: Path) -> dict[str, Any]:
    """``values`` with the epochs that fill ``minutes`` (at least one) and the batch size cut
    to the data when it is smaller."""
    batch = min(values.get("batch_size", 64), train_size)
    values = {**values, "batch_size": batch, "epochs": 1}
    steps = (minutes * 60) / seconds_per_step(values, out)
    epochs = max(1, int(steps // max(train_size // batch, 1)))
    return {**values, "epochs": epochs, "warmup_epochs": min(3.0, epochs / 10)}


def run(values: dict[str, Any], out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    summary = train(TrainConfig.from_dict({**values, "out": str(out)}))
    return {**summary, "minutes": (time.perf_counter() - started) / 60}


def fewshot(model: torch.nn.Module, train: ImageDataset, test: ImageDataset) -> dict[int, Any]:
    return fewshot_protocol(extract_features(model, train), train.labels,
                            extract_features(model, test), test.labels, SHOTS, range(3),
                            num_classes=len(train.classes))  # fmt: skip


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    inits = list(results["fewshot"])
    for offset, shots in enumerate(SHOTS):
        means = [results["fewshot"][i][str(shots)]["mean"] for i in inits]
        stds = [results["fewshot"][i][str(shots)]["std"] for i in inits]
        xs = np.arange(len(inits)) + (offset - 0.5) * 0.35
        left.bar(xs, means, 0.35, yerr=stds, label=f"{shots}-shot", capsize=3)
    left.set_xticks(range(len(inits)), inits)
    left.set_ylabel("few-shot test accuracy")
    left.legend()
    fractions = [row["fraction"] for row in results["finetune"]]
    for key, label in (("mpp", "MPP + fine-tune"), ("scratch", "scratch, same minutes")):
        right.plot(fractions, [row[key]["test_accuracy"] for row in results["finetune"]], "o-",
                   label=label)  # fmt: skip
    right.set_xscale("log")
    right.set_xlabel("fraction of the training labels")
    right.set_ylabel("test accuracy")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']} on {results['data']}: MPP {results['minutes']:g} min")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = Path(os.environ.get("VITKIT_DATA", "../shared/data")) / "cifar10-jpg"
    parser.add_argument("--data", default=str(default_data), help="labelled data (default: "
                        "$VITKIT_DATA/cifar10-jpg)")  # fmt: skip
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument("--minutes", type=float, default=60.0, help="MPP pre-training budget")
    parser.add_argument("--finetune-minutes", type=float, default=10.0,
                        help="fine-tuning budget per label fraction")  # fmt: skip
    parser.add_argument("--finetune-lr", type=float, default=0.03)
    parser.add_argument("--subset", type=int, help="only this many training images (a check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="run folders and results (default: a temp dir)")
    args = parser.parse_args()
    if args.data != "digits" and not Path(args.data).exists():
        sys.exit(f"{args.data} does not exist: set VITKIT_DATA=../shared/data or pass --data")
    out = args.out or Path(tempfile.mkdtemp(prefix="vitkit-mpp-"))
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    if args.subset:
        picked = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
        train_set = train_set.subset(picked[: args.subset])
        test_set = test_set.subset(torch.arange(min(args.subset, len(test_set))))
    data = save_npz(out / "data.npz", train_set, test_set)
    base = dict(model=args.model, data=data, seed=args.seed)
    n = len(train_set)

    # 1. Pre-training without labels, and the supervised reference for the same minutes.
    mpp = run(budgeted({**PRETRAIN, **base}, args.minutes, n, out / "calibrate-mpp"), out / "mpp")
    supervised_values = budgeted({**SUPERVISED, **base}, args.minutes, n, out / "calibrate-sup")
    supervised = run(supervised_values, out / "supervised")

    # 2. Few-shot accuracy of the frozen features.
    torch.manual_seed(args.seed)
    models = {
        "random init": create_model(args.model, num_classes=0),
        "MPP": load_pretrained(out / "mpp/best.safetensors"),
        "supervised": load_pretrained(out / "supervised/best.safetensors"),
    }
    shots = {name: fewshot(m, train_set, test_set) for name, m in models.items()}

    # 3. Fine-tuning with few labels against scratch for the same total minutes.
    rows = []
    for fraction in LABEL_FRACTIONS:
        subset = labelled_subset(train_set, fraction, args.seed)
        tag = f"{fraction:g}"
        labelled = dict(base, data=save_npz(out / f"labels-{tag}.npz", subset, test_set))
        tune = budgeted({**FINETUNE_DEFAULTS, **labelled, "model": None, "lr": args.finetune_lr,
                         "init_from": str(out / "mpp/best.safetensors"), "batch_size": 128},
                        args.finetune_minutes, len(subset), out / f"calibrate-ft-{tag}")  # fmt: skip
        scratch = budgeted({**SUPERVISED, **labelled}, args.minutes + args.finetune_minutes,
                           len(subset), out / f"calibrate-scratch-{tag}")  # fmt: skip
        rows.append(dict(fraction=fraction, images=len(subset),
                         mpp=run(tune, out / f"finetune-{tag}"),
                         scratch=run(scratch, out / f"scratch-{tag}")))  # fmt: skip

    results = dict(
        model=args.model, data=args.data, machine=machine(), torch=torch.__version__,
        minutes=args.minutes, finetune_minutes=args.finetune_minutes, train_images=n,
        mpp=dict(epochs=mpp["epochs"], test_loss=mpp["test_loss"],
                 test_accuracy=mpp.get("test_accuracy"), minutes=mpp["minutes"]),
        supervised=dict(epochs=supervised["epochs"], test_accuracy=supervised["test_accuracy"]),
        fewshot={name: {str(k): v for k, v in r.items()} for name, r in shots.items()},
        finetune=[dict(fraction=r["fraction"], images=r["images"],
                       **{k: {f: r[k][f] for f in ("test_accuracy", "epochs", "minutes")}
                          for k in ("mpp", "scratch")}) for r in rows],
    )  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figure(results, out / "mpp_transfer.png")

    print(f"\n{results['machine']}, torch {torch.__version__}; {args.model} on {args.data} "
          f"({n} training images); MPP pre-training {args.minutes:g} min "
          f"({mpp['epochs']} epochs, test MPP loss {mpp['test_loss']:.3f}); run folders in {out}\n")  # fmt: skip
    print(markdown_table(
        ["features", *(f"{s}-shot" for s in SHOTS)],
        [[name, *(f"{r[s]['mean']:.2%} ± {r[s]['std']:.2%}" for s in SHOTS)]
         for name, r in shots.items()],
    ))  # fmt: skip
    print()
    print(markdown_table(
        ["labels", "MPP + fine-tune", "scratch (same total minutes)", "minutes (MPP + ft / scratch)"],
        [[f"{r['fraction']:.0%} ({r['images']})", f"{r['mpp']['test_accuracy']:.2%}",
          f"{r['scratch']['test_accuracy']:.2%}",
          f"{mpp['minutes']:.1f} + {r['mpp']['minutes']:.1f} / {r['scratch']['minutes']:.1f}"]
         for r in rows],
    ))  # fmt: skip
    print(f"\nfigure: {out / 'mpp_transfer.png'}")


if __name__ == "__main__":
    main()
