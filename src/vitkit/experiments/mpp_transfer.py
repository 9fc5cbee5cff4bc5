"""Does masked patch prediction help, in small? The paper's self-supervision claim on one
labelled dataset (CIFAR-10 by default; ``benchmarks/mpp_transfer.py`` runs it):

1. Pre-train the model by masked patch prediction (``vitkit pretrain``'s defaults: 50% of the
   patches corrupted, 3-bit mean colour targets, Adam 2e-4, warm-up, cosine) on the training
   images for ``minutes`` (the MPP task never reads the labels).
2. Few-shot linear accuracy (10 and 25 shots per class, 3 seeds, the paper's closed-form
   ridge regression on frozen features) of that model, of the same model at random
   initialisation and of it trained with labels for the same minutes.
3. Fine-tune the MPP model with 1%, 10% and 100% of the labels (``vitkit finetune``'s recipe,
   SGD) for ``finetune_minutes``, against the same model trained from scratch on those labels
   for the same total time: pre-training plus fine-tuning minutes.

Every run is an ordinary run folder under ``out`` trained for its minutes by the training
loop's time budget (``max_minutes``: the schedule is fitted to the steps that fit, at the
speed re-measured as the run goes), so a run fills its minutes whatever the machine. Writes
``results.json`` and ``mpp_transfer.png`` to ``out``. At its default budgets the study takes
about six hours: killed, it continues where it stopped when run again with the same ``out``
(finished runs are read back, a started one resumes from its last checkpoint, few-shot scores
are read back from their runs' folders).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from vitkit.checkpoints import load_pretrained
from vitkit.data import ImageDataset, load_dataset
from vitkit.evaluation import extract_features, fewshot_indices, fewshot_protocol
from vitkit.experiments.runs import FEWSHOT_FILE, claim_study, finished_run, kept_result
from vitkit.experiments.runs import STUDY_FILE as STUDY_FILE  # its home was here
from vitkit.models import create_model
from vitkit.models.pretrained import PretrainedModel
from vitkit.training import TrainConfig, resolve_config
from vitkit.training.config import DEFAULT_BATCH_SIZE
from vitkit.utils.config import merge_tables
from vitkit.utils.files import atomic_write

# The supervised recipe of benchmarks/recipes/cifar10.toml, without its data and epochs.
SUPERVISED: dict[str, Any] = {
    "optim": {"name": "adam", "batch_size": 128, "lr": 1e-3},
    "augment": {
        "random_resized_crop": True,
        "crop_scale": (0.5, 1.0),
        "hflip": True,
        "label_smoothing": 0.1,
    },
}
# The pre-training runs: the `pretrain` preset (the paper's MPP recipe) with these settings.
PRETRAIN: dict[str, Any] = {
    "presets": ["pretrain"],
    "optim": {"batch_size": 128},
    "augment": {"random_resized_crop": True, "crop_scale": (0.5, 1.0), "hflip": True},
}
LABEL_FRACTIONS = (0.01, 0.1, 1.0)
# The folder of each initialisation in the study's, where its few-shot scores are kept (a
# trained one's run folder: deleted to train it again, it takes its scores with it).
FEWSHOT_FOLDERS = {"random init": "random-init", "MPP": "mpp", "supervised": "supervised"}
SHOTS = (10, 25)
# The length a time-boxed run is configured with: beyond what any budget here fits, so that the
# minutes decide; the loop fits the schedule (and the warm-up, a tenth of it) to them.
TIME_BOXED_EPOCHS = 10_000
RESULTS_FILE = "results.json"
FIGURE_FILE = "mpp_transfer.png"


@dataclass
class MppTransferStudy:
    """What to run: ``model`` on ``data`` (``"digits"`` or a dataset path with train and test
    splits), MPP pre-training for ``minutes``, fine-tuning for ``finetune_minutes`` per label
    fraction; ``subset`` keeps only that many training (and test) images, a quick check of the
    study, not a result. ``machine`` names the hardware in ``results.json``."""

    data: str
    out: Path
    model: str = "vit_cifar"
    minutes: float = 60.0
    finetune_minutes: float = 10.0
    finetune_lr: float = 0.03
    subset: int | None = None
    seed: int = 0
    machine: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.minutes <= 0 or self.finetune_minutes <= 0:
            raise ValueError(
                f"--minutes and --finetune-minutes must be positive, got {self.minutes} and "
                f"{self.finetune_minutes}"
            )
        if self.data != "digits" and not Path(self.data).exists():
            raise ValueError(f"{self.data} does not exist: set VITKIT_DATA or pass --data")

    def claim(self) -> None:
        """Write the settings into ``out``, or refuse an ``out`` holding another study."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("out", "machine")}
        claim_study(self.out, settings)


def time_boxed(values: dict[str, Any], minutes: float, train_size: int) -> dict[str, Any]:
    """``values`` (nested) trained for ``minutes`` in training steps (``max_minutes``), with the
    batch size cut to the data when it is smaller."""
    batch = values.get("optim", {}).get("batch_size", DEFAULT_BATCH_SIZE)
    length = {
        "max_minutes": minutes,
        "epochs": TIME_BOXED_EPOCHS,
        "warmup_epochs": TIME_BOXED_EPOCHS / 10,
    }
    return merge_tables(
        TrainConfig,
        values,
        {"optim": {"batch_size": min(batch, train_size)}, "schedule": length},
    )


def labelled_subset(train_set: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """``fraction`` of the images, the same number of each class (at least one), drawn as the
    few-shot images are."""
    if fraction >= 1.0:
        return train_set
    per_class = max(1, round(fraction * len(train_set) / len(train_set.classes)))
    chosen = fewshot_indices(train_set.labels, per_class, seed, len(train_set.classes))
    return train_set.subset(torch.from_numpy(np.sort(chosen)))


def study_splits(data: str, subset: int | None) -> tuple[ImageDataset, ImageDataset]:
    """The training and test images of ``data``; with ``subset``, that many random images of
    each split (a quick check of a study, not a result). Random, not the first ones: a folder
    lists its images class by class, so its first test images would hold a few classes only."""
    train_set, test_set = load_dataset(data, "train"), load_dataset(data, "test")
    if subset:
        generator = torch.Generator().manual_seed(0)
        train_set = train_set.subset(torch.randperm(len(train_set), generator=generator)[:subset])
        test_set = test_set.subset(torch.randperm(len(test_set), generator=generator)[:subset])
    return train_set, test_set


def save_npz(path: Path, train_set: ImageDataset, test_set: ImageDataset) -> str:
    """Both splits as one ``.npz`` data source (its class names kept)."""
    np.savez(
        path,
        x_train=train_set.images.numpy(),
        y_train=train_set.labels.numpy(),
        x_test=test_set.images.numpy(),
        y_test=test_set.labels.numpy(),
        classes=np.asarray(train_set.classes),
    )
    return str(path)


def run(values: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train one run (nested ``values``, their ``presets`` under them) into ``out``, or resume
    or read back the one there; its summary, with the wall-clock minutes it took."""
    values = merge_tables(TrainConfig, values, {"run": {"out": str(out)}})
    summary = finished_run(resolve_config(flags=values))
    return {**summary, "minutes": summary["wall_seconds"] / 60}


def random_init(model: str, seed: int) -> PretrainedModel:
    """``model`` as initialised under ``seed``, headless: the baseline for frozen features."""
    torch.manual_seed(seed)
    return create_model(model, num_classes=0)


def fewshot(model: torch.nn.Module, train_set: ImageDataset, test_set: ImageDataset) -> dict:
    """The few-shot protocol's scores of ``model``'s frozen features, by shots as a string (as
    JSON keeps them)."""
    scores = fewshot_protocol(
        extract_features(model, train_set),
        train_set.labels,
        extract_features(model, test_set),
        test_set.labels,
        SHOTS,
        range(3),
        num_classes=len(train_set.classes),
    )
    return {str(shots): score for shots, score in scores.items()}


def run_mpp_transfer(study: MppTransferStudy) -> dict[str, Any]:
    """Run the three steps (module doc); write and return the results."""
    out = study.out
    study.claim()
    train_set, test_set = study_splits(study.data, study.subset)
    data = save_npz(out / "data.npz", train_set, test_set)
    base = {"model": {"name": study.model}, "data": {"source": data}, "run": {"seed": study.seed}}
    n = len(train_set)

    # 1. Pre-training without labels, and the supervised reference for the same minutes.
    mpp = run(time_boxed(merge_tables(TrainConfig, PRETRAIN, base), study.minutes, n), out / "mpp")
    supervised = run(
        time_boxed(merge_tables(TrainConfig, SUPERVISED, base), study.minutes, n),
        out / "supervised",
    )

    # 2. Few-shot accuracy of the frozen features, kept in FEWSHOT_FOLDERS.
    loaders: dict[str, Callable[[], torch.nn.Module]] = {
        "random init": partial(random_init, study.model, study.seed),
        "MPP": partial(load_pretrained, out / "mpp/best.safetensors"),
        "supervised": partial(load_pretrained, out / "supervised/best.safetensors"),
    }

    def scores(load: Callable[[], torch.nn.Module]) -> dict[str, Any]:
        return fewshot(load(), train_set, test_set)

    shots = {
        name: kept_result(out / FEWSHOT_FOLDERS[name] / FEWSHOT_FILE, partial(scores, load))
        for name, load in loaders.items()
    }

    # 3. Fine-tuning with few labels against scratch for the same total minutes.
    rows: list[dict[str, Any]] = []
    for fraction in LABEL_FRACTIONS:
        subset = labelled_subset(train_set, fraction, study.seed)
        tag = f"{fraction:g}"
        labelled_data = save_npz(out / f"labels-{tag}.npz", subset, test_set)
        labelled = merge_tables(TrainConfig, base, {"data": {"source": labelled_data}})
        tuned = merge_tables(
            TrainConfig,
            labelled,
            {
                "presets": ["finetune"],
                "model": {"name": None, "init_from": str(out / "mpp/best.safetensors")},
                "optim": {"lr": study.finetune_lr, "batch_size": 128},
            },
        )
        scratch = merge_tables(TrainConfig, SUPERVISED, labelled)
        total = study.minutes + study.finetune_minutes
        tuned_run = run(
            time_boxed(tuned, study.finetune_minutes, len(subset)), out / f"finetune-{tag}"
        )
        scratch_run = run(time_boxed(scratch, total, len(subset)), out / f"scratch-{tag}")
        rows.append(dict(fraction=fraction, images=len(subset), mpp=tuned_run, scratch=scratch_run))

    kept = ("test_accuracy", "epochs", "minutes")
    results = dict(
        model=study.model,
        data=study.data,
        machine=study.machine,
        torch=torch.__version__,
        minutes=study.minutes,
        finetune_minutes=study.finetune_minutes,
        train_images=n,
        mpp=dict(
            epochs=mpp["epochs"],
            test_loss=mpp["test_loss"],
            test_accuracy=mpp.get("test_accuracy"),
            minutes=mpp["minutes"],
        ),
        supervised=dict(epochs=supervised["epochs"], test_accuracy=supervised["test_accuracy"]),
        fewshot=shots,
        finetune=[
            dict(
                fraction=r["fraction"],
                images=r["images"],
                **{k: {f: r[k][f] for f in kept} for k in ("mpp", "scratch")},
            )
            for r in rows
        ],
    )
    text = json.dumps(results, indent=2) + "\n"
    atomic_write(out / RESULTS_FILE, lambda tmp: tmp.write_text(text))
    fig = transfer_figure(results)
    atomic_write(out / FIGURE_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return results


def transfer_figure(results: dict[str, Any]) -> Figure:
    """Left: few-shot accuracy of each initialisation; right: fine-tuned MPP against scratch
    by the fraction of labels."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
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
        accuracy = [row[key]["test_accuracy"] for row in results["finetune"]]
        right.plot(fractions, accuracy, "o-", label=label)
    right.set_xscale("log")
    right.set_xlabel("fraction of the training labels")
    right.set_ylabel("test accuracy")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    data = Path(results["data"]).name or results["data"]  # the folder, not where it lies
    fig.suptitle(f"{results['model']} on {data}: MPP {results['minutes']:g} min")
    fig.tight_layout()
    return fig
