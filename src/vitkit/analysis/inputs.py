"""What an analysis reads: the checkpoint, the run folder around it, and the images to show.

A run folder is what ``vitkit train --out DIR`` writes (the names: ``vitkit.utils.runlayout``):
``best.safetensors`` and ``last.safetensors``, ``config.json`` (the training config, with the
model and the data source), ``metrics.jsonl``, ``curves.png`` and ``summary.json``. Its files
are read defensively: a run killed early or written by an older vitkit may lack any of them,
and the analysis then skips what needs them, with a note saying why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitkit.data import EvalPreprocessing, preprocess, preprocess_file
from vitkit.data.base import MAX_UNREADABLE_FRACTION, SkipLog
from vitkit.data.folders import expand_folder
from vitkit.data.images import UnreadableImage
from vitkit.data.sources import DataOptions, open_source
from vitkit.utils.runlayout import RunLayout, run_setting
from vitkit.utils.runlayout import locate_checkpoint as locate_checkpoint  # its home was here

SAMPLE_BATCH = 64


@dataclass
class RunFiles:
    """The parts of a run folder the report shows; ``notes`` says what could not be read."""

    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def setting(self, section: str, key: str) -> Any:
        """A setting of the run's config.json: ``[section] key`` of the nested config, or the
        flat key named like the section in earlier versions' (``model``, ``data``)."""
        return run_setting(self.config, section, key)


@dataclass
class Samples:
    """Model inputs (float, [-1, 1], NCHW) with, when known, their labels and class names."""

    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files passed over: "name (why)"


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"{path.name} is missing")
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        notes.append(f"{path.name} could not be read ({err})")
        return {}
    if not isinstance(value, dict):
        notes.append(f"{path.name} does not hold a JSON object")
        return {}
    return value


def read_run(folder: str | Path) -> RunFiles:
    """Read a run folder's config and summary, never failing on a damaged file."""
    files = RunLayout(folder)
    run = RunFiles(files.path)
    run.config = _read_json(files.config, run.notes)
    run.summary = _read_json(files.summary, run.notes)
    return run


def load_images(
    paths: Sequence[str | Path],
    cfg: Any,
    count: int | None = None,
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
) -> Samples:
    """The first ``count`` readable images of ``paths`` (default: all) as the model's inputs,
    exactly as ``vitkit predict`` makes them: ``vitkit.data.preprocess_file`` for the model
    config ``cfg`` (its channels, ``img_size`` and evaluation preprocessing).

    A folder stands for every image file under it (``expand_folder``), named by its path in
    the folder. A file Pillow cannot decode is logged and skipped, up to
    ``max_unreadable_fraction`` of the files; a missing file is an error (a mistyped name).
    Files are read only until ``count`` images are in hand, so a folder of many large photos
    costs no more than ``count`` of them.
    """
    named = [
        (file, str(file.relative_to(path)) if path.is_dir() else file.name)
        for path in map(Path, paths)
        for file in expand_folder(path)
    ]
    what = str(paths[0]) if len(paths) == 1 else f"the {len(paths)} paths given"
    skipped = SkipLog(what, len(named), max_unreadable_fraction)
    images: list[torch.Tensor] = []
    names: list[str] = []
    for file, name in named:
        if count is not None and len(images) == count:
            break
        try:
            images.append(preprocess_file(file, cfg))
        except UnreadableImage as err:
            if len(named) == 1:
                raise  # its own message says it best
            skipped.add([f"{file} ({err.reason})"])
            continue
        names.append(name)
    if not images:
        raise ValueError(f"none of the {len(named)} images given could be read")
    return Samples(torch.cat(images), names, skipped=list(skipped.skipped))


def sample_dataset(
    source: str | Path,
    cfg: Any,
    count: int,
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
) -> Samples:
    """``count`` images of a dataset (its test split, else its train split), classes in turn.

    The images are taken in the order: the first of every class, then the second of every
    class, and so on, so that a few samples already show several classes; they are resized,
    converted to the model's channels and scaled the way ``vitkit`` evaluates a model. Image
    folders and shards are streamed (decoded at the model's size, unreadable files skipped)
    until every class has ``count`` images, so a folder of large photos is never held whole.
    """
    options = DataOptions(in_memory="no", max_unreadable_fraction=max_unreadable_fraction)
    try:
        data, split = open_source(str(source), "test", options), "test"
    except ValueError:
        data, split = open_source(str(source), "train", options), "train"
    preprocessing = EvalPreprocessing.of(cfg)
    data.set_image_size(cfg.img_size, preprocessing)
    classes = data.info.classes
    kept: dict[int, list[tuple[int, torch.Tensor]]] = {}  # label -> (position, image)
    position, prepared = 0, False
    for batch in data.eval_batches(SAMPLE_BATCH):
        prepared = batch.cropped  # a streamed source applied the geometry in its workers
        labels = batch.labels if batch.labels is not None else torch.zeros(len(batch.images))
        for image, label in zip(batch.images, labels.long().tolist(), strict=True):
            if len(members := kept.setdefault(label, [])) < count:
                members.append((position, image))
            position += 1
        if len(kept) == len(classes or [0]) and all(len(m) >= count for m in kept.values()):
            break
    chosen = sorted(
        (rank, label, position, image)
        for label, members in kept.items()
        for rank, (position, image) in enumerate(members)
    )[:count]
    images = torch.stack([c[3] for c in chosen])
    images = preprocess(images, cfg.img_size, cfg.in_chans, preprocessing, prepared=prepared)
    names = [f"{split} #{c[2]}" for c in chosen]
    labels_kept = torch.tensor([c[1] for c in chosen]) if classes is not None else None
    log = getattr(data, "skipped", None)  # the sources that decode files keep a SkipLog
    skipped = list(log.skipped) if isinstance(log, SkipLog) else []
    return Samples(images, names, labels_kept, classes, skipped)


__all__ = [
    "RunFiles",
    "Samples",
    "load_images",
    "locate_checkpoint",
    "read_run",
    "sample_dataset",
]
