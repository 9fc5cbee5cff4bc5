"""The paper's data-size and compute comparison in small (Figures 3, 4 and 5): every model
trained on every stratified fraction of a training set, under one time budget or one number
of epochs, then one table and two figures (``vitkit experiment scaling``; the table, figures
and report are ``vitkit.analysis.scaling``'s).

    OUT/runs/<model>-f<fraction>/   a normal run folder per (model, fraction)
    OUT/results.csv, results.md, accuracy_vs_examples.png, accuracy_vs_compute.png, report.html

The experiment can be killed and run again with the same command: a run with a
``summary.json`` is done and read back, a started one is resumed from its last checkpoint,
and the table and figures are rewritten after every run.

Under a time budget every run is given it as ``max_minutes``: the training loop stops once it
has spent the budget in training steps and, so that the learning rate still decays to the end,
fits the schedule to the steps that fit in the time left at the speed it measures as it goes
(``Session.fit_to_budget``), up to the base config's epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitkit.analysis.scaling import result_row, write_results

# check_same_settings and dotted lived here before every experiment shared them.
from vitkit.experiments.runs import check_same_settings as check_same_settings
from vitkit.experiments.runs import dotted as dotted
from vitkit.experiments.runs import finished_run
from vitkit.training import RunFolder, TrainConfig
from vitkit.training.config import explicit_names, nest_flat_keys
from vitkit.training.loop import Progress
from vitkit.utils.config import merge_tables

# The settings the experiment sets in each run's config (by flag name); a base config may not.
EXPERIMENT_KEYS = ("model", "data", "train_fraction", "out", "max_minutes", "steps")


@dataclass
class ScalingExperiment:
    """What to train: ``models`` x ``fractions`` of ``data``'s training split, each for
    ``epochs`` or ``budget_minutes`` (exactly one), with ``base`` (TrainConfig values, nested
    or flat, e.g. from a TOML file) for everything else."""

    data: str
    fractions: Sequence[float]
    models: Sequence[str]
    out: Path
    epochs: int | None = None
    budget_minutes: float | None = None
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.fractions = sorted(set(self.fractions))
        self.models = list(dict.fromkeys(self.models))
        if (self.epochs is None) == (self.budget_minutes is None):
            raise ValueError("give exactly one of --epochs and --budget-minutes")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if not self.fractions or not all(0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"--fractions must lie in (0, 1], got {list(self.fractions)}")
        if not self.models:
            raise ValueError("--models names no model: give one or more (see `vitkit models`)")
        clashing = sorted(explicit_names(nest_flat_keys(self.base)[0]) & set(EXPERIMENT_KEYS))
        if clashing:
            raise ValueError(
                f"the experiment sets {', '.join(clashing)} itself: remove them from the config"
            )

    def folder(self, model: str, fraction: float) -> Path:
        return self.out / "runs" / f"{model}-f{fraction:g}"

    def config(self, model: str, fraction: float) -> TrainConfig:
        """The run's config: its length is ``epochs``, or ``max_minutes`` (see the module doc)."""
        length = (
            {"epochs": self.epochs}
            if self.epochs is not None
            else {"max_minutes": self.budget_minutes}
        )
        values = {
            "model": {"name": model},
            "data": {"source": self.data, "train_fraction": fraction},
            "schedule": length,
            "run": {"out": str(self.folder(model, fraction))},
        }
        base = nest_flat_keys(self.base)[0]
        return TrainConfig.from_nested(merge_tables(TrainConfig, base, values))


def run_scaling(
    experiment: ScalingExperiment,
    progress: Callable[[], AbstractContextManager[Progress | None]] | None = None,
) -> list[dict[str, Any]]:
    """Train (or resume, or read back) every run, then write the table, the figures and the
    report; returns the table's rows. ``progress()`` gives a context holding a progress
    callback for one run."""
    # Every config is built (and so checked) before anything is trained.
    configs = {
        (m, f): experiment.config(m, f) for m in experiment.models for f in experiment.fractions
    }
    # Under a budget, a run folder of an earlier version holds the steps it calibrated.
    ignore = {"schedule.steps"} if experiment.budget_minutes else set()
    rows: list[dict[str, Any]] = []
    for (model, fraction), cfg in configs.items():
        finished_run(cfg, ignore, progress)
        rows.append(result_row(RunFolder(experiment.folder(model, fraction)), fraction))
        write_results(rows, experiment.out)
    return rows
