"""The paper's data-size and compute comparison in small (Figures 3, 4 and 5): every model
trained on every stratified fraction of a training set, under one time budget or one number
of epochs, then one table and two figures (``vitkit experiment scaling``).

    OUT/runs/<model>-f<fraction>/   a normal run folder per (model, fraction)
    OUT/results.csv, results.md     one row per finished run
    OUT/accuracy_vs_examples.png    test accuracy against training images, a line per model
    OUT/accuracy_vs_compute.png     test accuracy against training FLOPs, a line per model
    OUT/report.html                 the table and both figures

The experiment can be killed and run again with the same command: a run with a
``summary.json`` is done and read back, a started one is resumed from its last checkpoint,
and the table and figures are rewritten after every run. Training compute is counted as
3 x the forward FLOPs of an image (``vitkit.models.flops_per_image``; backward is about twice
the forward) x the images trained on.

Under a time budget every run stops once it has spent the budget in training steps
(``max_minutes``); so that its learning rate still decays to the end, the schedule's length is
the number of steps the model's measured speed fits into the budget (``measure_train_speed``,
a few timed steps before the model's first run).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from vitkit.analysis.figures import save_figure
from vitkit.analysis.report import Section, render_report
from vitkit.checkpoints import read_checkpoint
from vitkit.data.sources import Batch, open_splits
from vitkit.models import flops_per_image
from vitkit.training import RunFolder, TrainConfig, train
from vitkit.training.config import explicit_names, nest_flat_keys, read_run_config
from vitkit.training.distributed import choose_device
from vitkit.training.evaluate import autocast
from vitkit.training.loop import Progress
from vitkit.training.optim import build_optimizer
from vitkit.training.tasks import build_task
from vitkit.utils.config import merge_tables
from vitkit.utils.files import atomic_write

logger = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SIZE_FIGURE = "accuracy_vs_examples.png"
COMPUTE_FIGURE = "accuracy_vs_compute.png"
REPORT_FILE = "report.html"
# The keys the experiment sets in each run's config; a base config may not set them.
EXPERIMENT_KEYS = ("model", "data", "train_fraction", "out", "max_minutes", "steps")
COLUMNS = (
    "model", "fraction", "examples", "params", "gflops_per_image", "train_images_per_s",
    "steps", "train_flops", "minutes", "test_accuracy",
)  # fmt: skip
HEADERS = (
    "model", "fraction", "examples", "params", "GFLOPs/image", "train img/s", "steps",
    "train FLOPs", "minutes", "test accuracy",
)  # fmt: skip


@dataclass
class ScalingExperiment:
    """What to train: ``models`` x ``fractions`` of ``data``'s training split, each for
    ``epochs`` or ``budget_minutes`` (exactly one), with ``base`` (TrainConfig values, e.g.
    from a TOML file) for everything else."""

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
        """The run's config; under a budget its ``steps`` are still 0 (see the module doc)."""
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
    configs = {(m, f): experiment.config(m, f) for m in experiment.models
               for f in experiment.fractions}  # fmt: skip
    speeds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for (model, fraction), cfg in configs.items():
        run = RunFolder(experiment.folder(model, fraction))
        check_same_settings(
            run, cfg, ignore={"schedule.steps"} if experiment.budget_minutes else set()
        )
        if run.summary.is_file():
            logger.info("%s is finished: reading its summary", run.path)
        else:
            with progress() if progress is not None else nullcontext() as callback:
                if run.holds_run():
                    logger.info("resuming the unfinished run in %s", run.path)
                    train(resume=run.path, progress=callback)
                else:
                    if experiment.budget_minutes is not None:
                        if model not in speeds:
                            speeds[model] = measure_train_speed(cfg)
                        seconds = 60 * experiment.budget_minutes
                        steps = max(1, int(seconds * speeds[model] / cfg.optim.batch_size))
                        cfg = cfg.replace(schedule={"steps": steps})
                    logger.info("training %s on %g of %s in %s", model, fraction,
                                experiment.data, run.path)  # fmt: skip
                    train(cfg, progress=callback)
        rows.append(result_row(run, fraction))
        write_results(rows, experiment.out)
    return rows


def check_same_settings(run: RunFolder, cfg: TrainConfig, ignore: set[str]) -> None:
    """Refuse to reuse a run folder trained with other settings than the experiment's now."""
    if not run.holds_run():
        return
    saved = dotted(read_run_config(run.config).to_dict())
    wanted = dotted(json.loads(json.dumps(cfg.to_dict())))
    ignored = {*ignore, "run.out"}
    differing = sorted(k for k in wanted.keys() - ignored if saved.get(k) != wanted[k])
    if differing:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted[k]!r} now" for k in differing)
        raise ValueError(
            f"{run.path} holds a run with other settings ({shown}): give another --out, or "
            "delete that folder to train it again"
        )


def dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config's values by dotted path (``optim.lr``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def measure_train_speed(cfg: TrainConfig, steps: int = 3) -> float:
    """Training images per second of ``cfg`` (its task, model, batch, precision and data
    augmentation) over ``steps`` optimizer steps after an untimed one; single process."""
    device = choose_device(cfg.run.device)
    task = build_task(cfg)
    source = open_splits(
        cfg.data.source,
        cfg.data.val_fraction,
        cfg.run.seed,
        cfg.data_options,
        train_fraction=cfg.data.train_fraction,
    ).train
    torch.manual_seed(cfg.run.seed)
    model = task.build_model(source.info).to(device)
    task.setup(model)
    net = task.trainable(model).train()
    optimizer = build_optimizer(net, cfg)
    batches = itertools.chain.from_iterable(
        source.train_batches(cfg.optim.micro_batch_size, seed=cfg.run.seed, epoch=epoch)
        for epoch in itertools.count()
    )
    started = time.perf_counter()
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        for _ in range(cfg.optim.accum_steps):
            batch = next(batches)
            inputs, targets = task.prepare(Batch(batch.images.to(device), batch.labels), step)
            with autocast(device, cfg.run.precision):
                result = task.step(net, inputs, targets)
            (result.loss / cfg.optim.accum_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    speed = steps * cfg.optim.batch_size / (time.perf_counter() - started)
    logger.info("%s trains at %.0f images/s here", cfg.model.name, speed)
    return speed


def result_row(run: RunFolder, fraction: float) -> dict[str, Any]:
    """One row of the table from a finished run folder."""
    summary = json.loads(run.summary.read_text())
    batch_size = read_run_config(run.config).optim.batch_size
    flops = flops_per_image(read_checkpoint(run.best).config)
    return dict(
        model=summary["model"],
        fraction=fraction,
        examples=summary["train_examples"],
        params=summary["num_parameters"],
        gflops_per_image=flops / 1e9,
        train_images_per_s=summary["images_per_second"],
        steps=summary["steps"],
        train_flops=3 * flops * summary["steps"] * batch_size,
        minutes=summary["train_seconds"] / 60,
        test_accuracy=summary["test_accuracy"],
    )


def formatted(row: dict[str, Any]) -> list[str]:
    """A row as people read it (the CSV keeps full precision)."""
    return [
        row["model"], f"{row['fraction']:g}", f"{row['examples']:,}", f"{row['params']:,}",
        f"{row['gflops_per_image']:.3g}", f"{row['train_images_per_s']:,.0f}",
        f"{row['steps']:,}", f"{row['train_flops']:.3g}", f"{row['minutes']:.2f}",
        f"{row['test_accuracy']:.2%}",
    ]  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [HEADERS, ["---"] * len(HEADERS), *map(formatted, rows)]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def write_results(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """Write the CSV and Markdown tables, both figures and the report into ``out``."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / RESULTS_CSV, lambda tmp: tmp.write_text(text.getvalue()))
    atomic_write(out / RESULTS_MD, lambda tmp: tmp.write_text(markdown_table(rows)))
    save_figure(accuracy_figure(rows, "examples", "training images"), out / SIZE_FIGURE)
    save_figure(
        accuracy_figure(rows, "train_flops", "training compute (FLOPs)"), out / COMPUTE_FIGURE
    )
    sections = [
        Section("Results", note="minutes: time in training steps; train FLOPs: 3 x forward "
                "FLOPs per image x images trained on", rows=[list(HEADERS), *map(formatted, rows)]),
        Section("Accuracy against training-set size", SIZE_CAPTION, [SIZE_FIGURE]),
        Section("Accuracy against training compute", COMPUTE_CAPTION, [COMPUTE_FIGURE]),
    ]  # fmt: skip
    page = render_report("Scaling: ViT against ResNets", sections)
    atomic_write(out / REPORT_FILE, lambda tmp: tmp.write_text(page))


SIZE_CAPTION = (
    "Test accuracy of each model trained on stratified fractions of the training set (the "
    "paper's Figures 3 and 4, in small). The paper's finding at ImageNet-21k and JFT scale: "
    "ResNets win on small data, ViT overtakes them as the data grows."
)
COMPUTE_CAPTION = (
    "The same runs against the compute they trained with (3 x forward FLOPs per image x "
    "images seen; the paper's Figure 5 counts pre-training exaFLOPs). Left and up is better: "
    "the paper finds ViT reaching a ResNet's accuracy with 2-4x less compute."
)


def accuracy_figure(rows: Sequence[dict[str, Any]], x: str, label: str) -> Figure:
    """Test accuracy against ``x`` (log scale), one line per model through its fractions."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r[x])
        ax.plot([r[x] for r in mine], [100 * r["test_accuracy"] for r in mine], "o-",
                label=model)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    if rows:
        ax.legend()
    return fig
