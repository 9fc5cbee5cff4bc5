"""The results of the scaling experiment (``vitkit.experiments.scaling``, the paper's Figures 3,
4 and 5 in small): a table row per finished run folder, the CSV and Markdown tables, the two
figures and the report.

    OUT/results.csv, results.md     one row per finished run
    OUT/accuracy_vs_examples.png    test accuracy against training images, a line per model
    OUT/accuracy_vs_compute.png     test accuracy against training FLOPs, a line per model
    OUT/report.html                 the table and both figures

Training compute is counted as 3 x the forward FLOPs of a training image
(``vitkit.models.flops_per_image``; backward is about twice the forward; patch dropout, if the
run used it, lowers both) x the images trained on. Reads run folders (``summary.json``,
``config.json``, ``best.safetensors``); trains nothing.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vitkit.analysis.figures import save_figure
from vitkit.analysis.report import Section, render_report
from vitkit.checkpoints import read_checkpoint
from vitkit.models import flops_per_image
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout, run_setting

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SIZE_FIGURE = "accuracy_vs_examples.png"
COMPUTE_FIGURE = "accuracy_vs_compute.png"
REPORT_FILE = "report.html"
COLUMNS = (
    "model",
    "fraction",
    "examples",
    "params",
    "gflops_per_image",
    "train_images_per_s",
    "steps",
    "train_flops",
    "minutes",
    "test_accuracy",
)
HEADERS = (
    "model",
    "fraction",
    "examples",
    "params",
    "GFLOPs/image",
    "train img/s",
    "steps",
    "train FLOPs",
    "minutes",
    "test accuracy",
)


def result_row(run: RunLayout, fraction: float) -> dict[str, Any]:
    """One row of the table from a finished run folder."""
    summary = json.loads(run.summary.read_text())
    batch_size = run_setting(
        json.loads(run.config.read_text()), "optim", "batch_size", "batch_size"
    )
    config = read_checkpoint(run.best).config
    flops = flops_per_image(config)
    return dict(
        model=summary["model"],
        fraction=fraction,
        examples=summary["train_examples"],
        params=summary["num_parameters"],
        gflops_per_image=flops / 1e9,
        train_images_per_s=summary["images_per_second"],
        steps=summary["steps"],
        train_flops=3 * flops_per_image(config, training=True) * summary["steps"] * batch_size,
        minutes=summary["train_seconds"] / 60,
        test_accuracy=summary["test_accuracy"],
    )


def formatted(row: dict[str, Any]) -> list[str]:
    """A row as people read it (the CSV keeps full precision)."""
    return [
        row["model"],
        f"{row['fraction']:g}",
        f"{row['examples']:,}",
        f"{row['params']:,}",
        f"{row['gflops_per_image']:.3g}",
        f"{row['train_images_per_s']:,.0f}",
        f"{row['steps']:,}",
        f"{row['train_flops']:.3g}",
        f"{row['minutes']:.2f}",
        f"{row['test_accuracy']:.2%}",
    ]


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
        Section(
            "Results",
            note="minutes: time in training steps; train FLOPs: 3 x forward "
            "FLOPs per image x images trained on",
            rows=[list(HEADERS), *map(formatted, rows)],
        ),
        Section("Accuracy against training-set size", SIZE_CAPTION, [SIZE_FIGURE]),
        Section("Accuracy against training compute", COMPUTE_CAPTION, [COMPUTE_FIGURE]),
    ]
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
        ax.plot([r[x] for r in mine], [100 * r["test_accuracy"] for r in mine], "o-", label=model)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    if rows:
        ax.legend()
    return fig


# What trains moved up to ``vitkit.experiments.scaling``, which analysis may not import.
MOVED = ("ScalingExperiment", "run_scaling", "check_same_settings", "EXPERIMENT_KEYS")


def __getattr__(name: str) -> Any:
    if name in MOVED:
        raise AttributeError(
            f"vitkit.analysis.scaling.{name} moved: import it from vitkit.experiments.scaling"
        )
    if name == "measure_train_speed":
        raise AttributeError(
            "vitkit.analysis.scaling.measure_train_speed is gone: a time budget is the training "
            "loop's max_minutes, which measures the speed as the run goes"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
