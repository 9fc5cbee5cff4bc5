"""Why masked patch prediction does or does not help, in small: pilots on the three things the
paper's appendix B.1.2 varied (how many patches are corrupted, what a corrupted patch
predicts, how long pre-training runs), each against the paper's setting
(``benchmarks/mpp_pilots.py`` runs them).

Every pilot pre-trains the model by MPP for a number of epochs (epochs rather than minutes:
the pilots compare settings at equal steps, not machines) and is scored two ways:

- few-shot linear accuracy (the paper's closed-form ridge regression, 3 draws) of its frozen
  features, read at the [class] token (what a fine-tuned head sees) and as the patch tokens'
  mean (what masked patch prediction trains: the [class] token predicts nothing);
- fine-tuning (``vitkit finetune``'s recipe) on a fraction of the labels for a number of epochs.

The baselines score the same ways: the model at random initialisation, fine-tuned by the same
recipe, and trained from scratch by the supervised CIFAR recipe for the fine-tuning's epochs.
Every run is an ordinary run folder under ``out``; killed, the pilots continue where they
stopped when run again with the same ``out``, and more pilots can be added to it later.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vitkit.checkpoints import load_pretrained
from vitkit.data import ImageDataset
from vitkit.experiments.mpp_transfer import (
    PRETRAIN,
    SHOTS,
    SUPERVISED,
    fewshot,
    labelled_subset,
    random_init,
    run,
    save_npz,
    study_splits,
)
from vitkit.experiments.runs import FEWSHOT_FILE, claim_study, kept_result
from vitkit.models.mpp import MPPTarget
from vitkit.models.pretrained import PretrainedModel
from vitkit.models.vit import VisionTransformer
from vitkit.training import TrainConfig
from vitkit.utils.config import merge_tables
from vitkit.utils.files import atomic_write

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Pilot:
    """One MPP setting: the target, the fraction of patches corrupted and the length, as a
    multiple of the study's pre-training epochs."""

    name: str
    target: MPPTarget = "mean_colour"
    rate: float = 0.5
    length: int = 1


# The paper's setting first, then one change each, in the order they are worth running when
# time is short.
PILOTS = (
    Pilot("paper"),
    Pilot("4x longer", length=4),
    Pilot("15% corrupted", rate=0.15),
    Pilot("pixels (L2)", target="pixels"),
    Pilot("4x4 colours", target="downsized"),
)
PILOT_NAMES = tuple(p.name for p in PILOTS)
# The baselines, scored like the pilots: no pre-training.
RANDOM_INIT = "random init"
SCRATCH = "scratch"


@dataclass
class MppPilotStudy:
    """``model`` on ``data`` (``"digits"`` or a dataset path with train and test splits):
    each of ``pilots`` pre-trained for ``epochs`` times its length at ``batch_size`` and
    ``precision``, fine-tuned on ``label_fraction`` of the labels for ``finetune_epochs``;
    ``subset`` keeps only that many training (and test) images, a check of the pilots, not a
    result. ``machine`` names the hardware in ``results.json``."""

    data: str
    out: Path
    model: str = "vit_cifar"
    epochs: int = 10
    batch_size: int = 128
    precision: str = "fp32"
    label_fraction: float = 0.1
    finetune_epochs: int = 20
    finetune_lr: float = 0.03
    pilots: tuple[str, ...] = PILOT_NAMES
    subset: int | None = None
    seed: int = 0
    machine: str = ""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        unknown = sorted(set(self.pilots) - set(PILOT_NAMES))
        if unknown:
            raise ValueError(f"unknown pilots {unknown}: choose from {list(PILOT_NAMES)}")
        if self.epochs < 1 or self.finetune_epochs < 1:
            raise ValueError(
                f"--epochs and --finetune-epochs must be at least 1, got {self.epochs} and "
                f"{self.finetune_epochs}"
            )
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.data != "digits" and not Path(self.data).exists():
            raise ValueError(f"{self.data} does not exist: set VITKIT_DATA or pass --data")

    def claim(self) -> None:
        """Write the settings into ``out``, or refuse an ``out`` holding other pilots' runs
        (the choice of pilots may change: each is its own run)."""
        kept = {k: v for k, v in asdict(self).items() if k not in ("out", "machine", "pilots")}
        claim_study(self.out, kept)


def run_mpp_pilots(study: MppPilotStudy) -> dict[str, Any]:
    """Train and score the baselines, then each pilot (module doc); write ``results.json``
    after each, so a stopped study keeps what it finished, and return the results."""
    out = study.out
    study.claim()
    train_set, test_set = study_splits(study.data, study.subset)
    base = {
        "model": {"name": study.model},
        "data": {"source": save_npz(out / "data.npz", train_set, test_set)},
        "run": {"seed": study.seed, "precision": study.precision},
    }
    labelled = labelled_subset(train_set, study.label_fraction, study.seed)
    labelled_base = merge_tables(
        TrainConfig,
        base,
        {"data": {"source": save_npz(out / "labels.npz", labelled, test_set)}},
    )
    # Fine-tuning and training from scratch: the labelled images for as many epochs, in
    # batches of 128 (or all of them, when fewer).
    labelled_length = {
        "optim": {"batch_size": min(128, len(labelled))},
        "schedule": {"epochs": study.finetune_epochs},
    }
    tune = merged({"presets": ["finetune"], "optim": {"lr": study.finetune_lr}}, labelled_length)
    pilots = [p.name for p in PILOTS if p.name in study.pilots]  # in the order they run
    results: dict[str, Any] = dict(
        study={**{k: v for k, v in asdict(study).items() if k != "out"}, "pilots": pilots},
        torch=torch.__version__,
        train_images=len(train_set),
        labelled_images=len(labelled),
        rows={},
    )

    def save() -> None:
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(out / RESULTS_FILE, lambda tmp: tmp.write_text(text))

    # The baselines: the features of a random initialisation, that initialisation fine-tuned,
    # and supervised training from scratch for as many epochs.
    tuned = run(merged(labelled_base, tune), out / "random-init-finetune")
    results["rows"][RANDOM_INIT] = dict(
        fewshot=features_scores(
            functools.partial(random_init, study.model, study.seed),
            train_set,
            test_set,
            out / "random-init",
        ),
        finetune=scores(tuned),
    )
    scratch = run(merged(SUPERVISED, labelled_base, labelled_length), out / "scratch")
    results["rows"][SCRATCH] = dict(finetune=scores(scratch))
    save()

    for pilot in (p for p in PILOTS if p.name in pilots):
        folder = out / slug(pilot.name)
        pretrain = {
            "task": {"mpp": {"target": pilot.target, "rate": pilot.rate}},
            "optim": {"batch_size": min(study.batch_size, len(train_set))},
            "schedule": {"epochs": study.epochs * pilot.length},
        }
        mpp = run(merged(PRETRAIN, base, pretrain), folder / "mpp")
        weights = folder / "mpp" / "best.safetensors"
        init = {"model": {"name": None, "init_from": str(weights)}}
        tuned = run(merged(labelled_base, tune, init), folder / "finetune")
        results["rows"][pilot.name] = dict(
            pilot=asdict(pilot),
            mpp=dict(
                epochs=mpp["epochs"],
                steps=mpp["steps"],
                test_loss=mpp["test_loss"],
                test_accuracy=mpp.get("test_accuracy"),
                minutes=mpp["minutes"],
            ),
            fewshot=features_scores(
                functools.partial(load_pretrained, weights), train_set, test_set, folder / "mpp"
            ),
            finetune=scores(tuned),
        )
        save()
    return results


def merged(*tables: dict[str, Any]) -> dict[str, Any]:
    """Nested config values, each table's settings over the ones before."""
    return functools.reduce(lambda values, more: merge_tables(TrainConfig, values, more), tables)


def slug(name: str) -> str:
    """A pilot's folder name: ``"15% corrupted"`` -> ``15pc-corrupted``."""
    kept = name.replace("%", "pc").replace("(", "").replace(")", "").replace(" ", "-")
    return kept.lower()


def scores(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("test_accuracy", "epochs", "steps", "minutes")}


class PatchTokenMean(VisionTransformer):
    """A ViT whose features are its patch tokens' mean, the [class] token left out: what masked
    patch prediction trains (it asks nothing of the [class] token)."""

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, self.num_prefix :].mean(dim=1)


def features_scores(
    load: Callable[[], PretrainedModel],
    train_set: ImageDataset,
    test_set: ImageDataset,
    folder: Path,
) -> dict[str, Any]:
    """Few-shot accuracy of the [class] token and of the patch tokens' mean of the model
    ``load()`` gives, kept in ``folder`` (the model's run folder: deleted to train it again, it
    takes them with it) so that a continued study neither loads the model nor computes them
    again."""

    def compute() -> dict[str, Any]:
        model = load()
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"the MPP pilots pre-train a ViT, not a {type(model).__name__}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        patch_mean = PatchTokenMean(model.cfg)
        patch_mean.load_state_dict(model.state_dict())
        return {
            pooling: fewshot(m.to(device), train_set, test_set)
            for pooling, m in (("class token", model), ("patch mean", patch_mean))
        }

    return kept_result(folder / FEWSHOT_FILE, compute)


__all__ = ["PILOTS", "SHOTS", "MppPilotStudy", "Pilot", "run_mpp_pilots"]
