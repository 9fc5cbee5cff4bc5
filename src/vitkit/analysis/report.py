"""``analyze``: every analysis of one checkpoint as PNG figures and one ``report.html``.

The report is a plain HTML page next to its PNGs (relative links, no script, no server), so
it opens from the file system and the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from vitkit.analysis import figures
from vitkit.analysis.attention import (
    attention_maps,
    attention_rollout,
    collect_attentions,
    mean_attention_distance,
)
from vitkit.analysis.embeddings import embedding_filter_components, position_embedding_similarity
from vitkit.analysis.inputs import (
    RunFiles,
    Samples,
    load_images,
    locate_checkpoint,
    read_run,
    sample_dataset,
)
from vitkit.analysis.requirements import NotApplicable
from vitkit.checkpoints import load_pretrained
from vitkit.data.base import SHOWN_SKIPPED
from vitkit.data.folders import is_unlabelled_folder
from vitkit.evaluation.splits import run_data_options
from vitkit.models import VisionTransformer, architecture_of, flops_per_image
from vitkit.models.pretrained import PretrainedModel
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout

REPORT_FILE = "report.html"
MAX_SHOWN_FILES = 16  # attention figures drawn by default for image files (a folder's many)

CAPTIONS = {
    "maps": "Each row is a layer, each column a head. The colour over the image is how much "
    "the {query} attends to each patch (bright = more), scaled to each panel's own maximum, "
    "so compare where, not how much, across panels. Early layers often attend locally, late "
    "layers to the object that decides the class.",
    "rollout": "Attention rollout (Abnar & Zuidema, 2020; the paper's Figure 6): per layer the "
    "heads' attention is averaged, the identity is added for the residual connection, rows are "
    "renormalised, and the layers are multiplied through. The colour is how much of each input "
    "patch flows into the {query} at the output (bright = more, scaled per image). Titles give "
    "{titles}.",
    "distance": "Each dot is one head: the attention-weighted average distance, in pixels, "
    "between a query patch and the patches it attends to, averaged over query patches and "
    "over {count} image(s) (the paper's Figure 7, right); the [class] token is left out and "
    "the remaining weights renormalised. Low dots are heads that look locally, like a "
    "convolution; high dots integrate information across the image. The dotted line is the "
    "image side.",
    "position": "Tile (row r, column c) shows the cosine similarity of the position embedding "
    "of the patch at row r, column c to the embeddings of all patches (the paper's Figure 7, "
    "centre). A learned embedding that has picked up the 2-D image topology shows a bright "
    "spot at the patch's own place, fading with distance, and row and column stripes.",
    "filters": "The first {count} principal components of the patch projection's filters "
    "(the paper's Figure 7, left), in order of explained variance ({variance}), each stretched "
    "to its own range ({colours}). In a trained model they look like plausible basis "
    "functions for the fine structure within a patch (smooth gradients, edges, stripes); "
    "noise-like components mean the projection has learned little.",
    "curves": "Loss and accuracy against the optimizer step, as the run drew them from its "
    "metrics.jsonl: training (averaged over each logging interval) and validation. A gap that "
    "opens between the two is overfitting.",
    "confusion": "Rows are the true classes, columns the predicted ones, on the run's test "
    "split: the numbers are image counts, the shade is the share of the row. Everything off "
    "the diagonal is a mistake; a bright off-diagonal cell names a confused pair.",
}


@dataclass
class Section:
    """One part of the report: figures with a caption saying how to read them, or a note."""

    title: str
    caption: str = ""
    images: list[str] = field(default_factory=list)  # PNG names, relative to the report
    note: str = ""  # why the section is empty, or a remark under it
    table: list[tuple[str, str]] = field(default_factory=list)  # (name, value) pairs
    rows: list[list[str]] = field(default_factory=list)  # a table: its header, then its rows


def render_report(title: str, sections: Sequence[Section]) -> str:
    """The report as one HTML page linking its images by relative path."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for section in sections:
        body.append(f"<section><h2>{esc(section.title)}</h2>")
        if section.table:
            rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in section.table)
            body.append(f"<table>{rows}</table>")
        if section.rows:
            header, *rest = section.rows
            cells = ["".join(f"<th>{esc(c)}</th>" for c in header)]
            cells += ["".join(f"<td>{esc(c)}</td>" for c in row) for row in rest]
            body.append(
                "<table class='grid'>" + "".join(f"<tr>{c}</tr>" for c in cells) + "</table>"
            )
        for name in section.images:
            body.append(
                f'<figure><a href="{esc(name)}"><img src="{esc(name)}" alt="{esc(section.title)}">'
                "</a></figure>"
            )
        if section.caption:
            body.append(f"<p class='caption'>{esc(section.caption)}</p>")
        if section.note:
            body.append(f"<p class='note'>{esc(section.note)}</p>")
        body.append("</section>")
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;height:auto}figure{margin:0.5em 0}"
        ".caption{color:#444;max-width:50em}.note{color:#a60}"
        "th{text-align:left;padding-right:1em;font-weight:normal;color:#555}"
        ".grid td{text-align:right;padding:0 0.6em}.grid th{padding:0 0.6em}"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{style}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The results of a run's summary.json, formatted for people: accuracies as percentages,
    other metrics to 4 significant digits, durations in minutes and seconds, speeds in
    images per second."""
    rows = []
    for key, value in summary.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        for prefix, label in (("test_", "test"), ("best_val_", "best validation")):
            if key.startswith(prefix):
                metric = key.removeprefix(prefix)
                shown = f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4g}"
                rows.append((f"{label} {metric.replace('_', ' ')}", shown))
    if isinstance(summary.get("epochs"), int):
        rows.append(("epochs", f"{summary['epochs']} ({summary.get('steps', '?')} steps)"))
    if isinstance(summary.get("wall_seconds"), int | float):
        rows.append(("training time", format_duration(summary["wall_seconds"])))
    if isinstance(summary.get("images_per_second"), int | float):
        rows.append(("training speed", f"{summary['images_per_second']:,.0f} images/s"))
    return rows


def format_duration(seconds: float) -> str:
    """``59.2 s``, ``12 min 5 s``, ``3 h 4 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _model_section(
    model: PretrainedModel, checkpoint: Path, run: RunFiles | None, classes: list[str] | None
) -> Section:
    cfg = model.cfg
    architecture = architecture_of(cfg)
    rows = [
        ("checkpoint", str(checkpoint)),
        ("architecture", architecture.name),
        ("input", f"{cfg.img_size[0]}x{cfg.img_size[1]}, {cfg.in_chans} channel(s)"),
        *architecture.describe(cfg).rows,
        ("parameters", f"{model.num_parameters():,}"),
        ("GFLOPs per image", f"{flops_per_image(cfg) / 1e9:.3g}"),
    ]
    if classes:
        listed = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        rows.append(("classes", f"{len(classes)}: {listed}"))
    note = "" if run is not None else "Not a run folder: no training curves or test results."
    if run is not None:
        for section, key in (("model", "name"), ("data", "source")):
            if section in run.config:
                rows.append((f"run {section}", str(run.setting(section, key))))
        rows += summary_rows(run.summary)
        note = "; ".join(run.notes)
    return Section("Model", table=rows, note=note)


def _pick_images(
    model: PretrainedModel,
    run: RunFiles | None,
    images: Sequence[str | Path] | None,
    data: str | None,
    count: int,
    max_unreadable_fraction: float | None,
) -> Samples:
    folder = run.folder if run is not None else None
    limit = run_data_options(folder, max_unreadable_fraction).max_unreadable_fraction
    if images:
        return load_images(images, model.cfg, count, limit)
    source = data or (run.setting("data", "source") if run is not None else None)
    if not isinstance(source, str) or not source:
        raise ValueError(
            "no images to analyse: pass --images FILE..., or --data SOURCE (e.g. 'digits' or "
            "a dataset folder), or a run folder whose config.json names its data"
        )
    path = Path(source).expanduser()
    if is_unlabelled_folder(path):  # no classes to sample in turn
        return load_images([path], model.cfg, count, limit)
    return sample_dataset(source, model.cfg, count, limit)


def _image_titles(
    model: PretrainedModel, samples: Samples, count: int, classes: list[str] | None
) -> tuple[list[str], str]:
    """A title for each shown image, and the caption's words for what the titles give."""
    names = samples.names[:count]
    if not model.cfg.num_classes:
        return names, "the image names"

    def class_name(label: int) -> str:
        return classes[label] if classes and label < len(classes) else str(label)

    with torch.no_grad():
        indices = model(samples.images[:count]).argmax(dim=1).tolist()
    predicted = [class_name(i) for i in indices]
    if samples.labels is None:
        titles = [f"{n}: {p}" for n, p in zip(names, predicted, strict=True)]
        return titles, "the image name and the predicted class"
    truth = [class_name(int(label)) for label in samples.labels[:count]]
    titles = [f"true {t}, pred {p}" for t, p in zip(truth, predicted, strict=True)]
    return titles, "the true and predicted class"


def _run_sections(run: RunFiles, out_dir: Path) -> list[Section]:
    curves = RunLayout(run.folder).curves  # drawn by the training run itself
    if curves.is_file():
        name = "training-curves.png"
        atomic_write(out_dir / name, lambda tmp: shutil.copyfile(curves, tmp))
        sections = [Section("Training curves", CAPTIONS["curves"], [name])]
    else:
        note = f"the run has no {curves.name} (training draws it when it ends)"
        sections = [Section("Training curves", note=note)]
    classes = run.summary.get("classes")
    try:
        matrix = np.asarray(run.summary.get("confusion_matrix"), dtype=np.int64)
        fits = classes is not None and matrix.shape == (len(classes), len(classes))
    except (TypeError, ValueError):
        fits = False
    if fits and classes is not None:
        path = figures.save_figure(
            figures.confusion_matrix_figure(matrix, [str(c) for c in classes]),
            out_dir / "confusion-matrix.png",
        )
        sections.append(Section("Confusion matrix (test)", CAPTIONS["confusion"], [path.name]))
    else:
        sections.append(
            Section(
                "Confusion matrix (test)",
                note="summary.json has no square confusion_matrix matching its classes",
            )
        )
    return sections


ATTENTION_TITLES = (
    "Attention maps per layer and head",
    "Attention rollout",
    "Mean attention distance",
)


def _attention_sections(
    model: PretrainedModel,
    samples: Samples,
    num_images: int,
    distance_images: int,
    batch_size: int,
    classes: list[str] | None,
    out_dir: Path,
) -> list[Section]:
    shown = samples.images[:num_images]
    try:
        attentions = collect_attentions(model, shown)
    except NotApplicable as err:
        return [Section(title, note=f"Not shown: {err}.") for title in ATTENTION_TITLES]
    vit = cast(VisionTransformer, model)  # it has attention
    cfg, prefix = vit.cfg, vit.num_prefix
    query = "[class] token" if prefix else "mean over all patches (gap model)"

    maps = attention_maps(attentions, cfg.grid, prefix)
    map_files = [
        figures.save_figure(
            figures.attention_maps_figure(shown[i].numpy(), maps[:, i]),
            out_dir / f"attention-maps-{i + 1}.png",
        ).name
        for i in range(len(shown))
    ]
    note = ""
    if samples.skipped:
        count, listed = len(samples.skipped), "; ".join(samples.skipped[:SHOWN_SKIPPED])
        more = f"; and {count - SHOWN_SKIPPED} more" if count > SHOWN_SKIPPED else ""
        note = f"Skipped {count} unreadable image file(s): {listed}{more}."
    caption = CAPTIONS["maps"].format(query=query)
    sections = [Section(ATTENTION_TITLES[0], caption, map_files, note=note)]

    titles, titles_give = _image_titles(model, samples, num_images, classes)
    rollout = attention_rollout(attentions, cfg.grid, prefix)
    fig = figures.rollout_figure(shown.numpy(), rollout, titles)
    name = figures.save_figure(fig, out_dir / "attention-rollout.png").name
    caption = CAPTIONS["rollout"].format(query=query, titles=titles_give)
    sections.append(Section(ATTENTION_TITLES[1], caption, [name]))

    pool = samples.images[:distance_images]
    total = np.zeros((cfg.depth, cfg.num_heads))
    for start in range(0, len(pool), batch_size):  # batches bound the attention's memory
        batch = pool[start : start + batch_size]
        attentions = collect_attentions(model, batch)
        total += len(batch) * mean_attention_distance(
            attentions, cfg.grid, vit.patch_embed.reduction, prefix
        )
    fig = figures.attention_distance_figure(total / len(pool), max(cfg.img_size))
    name = figures.save_figure(fig, out_dir / "attention-distance.png").name
    caption = CAPTIONS["distance"].format(count=len(pool))
    sections.append(Section(ATTENTION_TITLES[2], caption, [name]))
    return sections


def _embedding_sections(model: PretrainedModel, out_dir: Path) -> list[Section]:
    sections = []
    title = "Position-embedding similarity"
    try:
        fig = figures.position_similarity_figure(position_embedding_similarity(model))
        name = figures.save_figure(fig, out_dir / "position-similarity.png").name
        sections.append(Section(title, CAPTIONS["position"], [name]))
    except NotApplicable as err:
        sections.append(Section(title, note=f"Not shown: {err}."))
    title = "Embedding filters"
    try:
        pca = embedding_filter_components(model)
        fig = figures.filters_figure(pca.components)
        name = figures.save_figure(fig, out_dir / "embedding-filters.png").name
        caption = CAPTIONS["filters"].format(
            count=len(pca.components),
            variance=f"together {100 * pca.explained_variance_ratio.sum():.0f}% of the variance",
            colours="RGB" if model.cfg.in_chans == 3 else "grey",
        )
        sections.append(Section(title, caption, [name]))
    except NotApplicable as err:
        sections.append(Section(title, note=f"Not shown: {err}."))
    return sections


def analyze(
    checkpoint: str | Path,
    out_dir: str | Path,
    images: Sequence[str | Path] | None = None,
    data: str | None = None,
    num_images: int | None = None,
    distance_images: int = 32,
    batch_size: int = 16,
    max_unreadable_fraction: float | None = None,
) -> Path:
    """Write every analysis of ``checkpoint`` into ``out_dir``; return the report's path.

    ``checkpoint`` is a run folder, a checkpoint in one, or any checkpoint vitkit reads.
    The images are ``images`` (files, or folders of them) if given, else samples of ``data``
    or of the run's data. The first ``num_images`` (default: every image file up to
    ``MAX_SHOWN_FILES``, or 4 samples) get attention maps and rollout; up to
    ``distance_images`` are averaged for the mean attention distance. Of the files,
    ``max_unreadable_fraction`` may be unreadable (skipped; default: the run's setting, else
    ``MAX_UNREADABLE_FRACTION``).
    """
    if min(1 if num_images is None else num_images, distance_images, batch_size) < 1:
        raise ValueError("num_images, distance_images and batch_size must be at least 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: give a folder for the figures and report.html")
    checkpoint_path, run_dir = locate_checkpoint(checkpoint)
    model = load_pretrained(checkpoint_path).eval()
    run = read_run(run_dir) if run_dir is not None else None
    default_shown = MAX_SHOWN_FILES if images else 4
    count = max(num_images or default_shown, distance_images)
    samples = _pick_images(model, run, images, data, count, max_unreadable_fraction)
    if num_images is None:
        num_images = min(len(samples.images), default_shown)
    classes = samples.classes or (run.summary.get("classes") if run else None)
    classes = classes or model.cfg.extra.get("classes")
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = [
        _model_section(model, checkpoint_path, run, classes),
        *_attention_sections(
            model, samples, num_images, distance_images, batch_size, classes, out_dir
        ),
        *_embedding_sections(model, out_dir),
        *(_run_sections(run, out_dir) if run is not None else []),
    ]
    report = out_dir / REPORT_FILE
    page = render_report(f"vitkit analysis: {checkpoint_path.name}", sections)
    atomic_write(report, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return report


__all__ = ["Section", "analyze", "render_report"]
