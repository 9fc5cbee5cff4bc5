"""Which images a checkpoint is evaluated on, so that they are never images it was trained on.

A run folder records the data it trained on, the seed and the validation fraction
(``config.json``): evaluating a checkpoint of that run on the same data splits it again as the
run did, so "test" means the run's own held-out images (``run_splits``, ``evaluation_data``).
Single-split data without such a run is evaluated whole, with a note that says so; fitting on
frozen features (``frozen_features``: few-shot, linear probe, k-NN) holds out a stratified
``HELD_OUT_TEST`` of it instead, as ``vitkit train`` holds it out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.data import load_dataset
from vitkit.data.base import MAX_UNREADABLE_FRACTION
from vitkit.data.sources import (
    HELD_OUT_TEST,
    DataOptions,
    DataSource,
    InMemorySource,
    Splits,
    open_source,
    open_splits,
    same_images,
)
from vitkit.data.streaming import StreamingFolderSource
from vitkit.evaluation.features import source_features
from vitkit.utils.runlayout import RunLayout, run_setting

# A class needs this many readable images for the held-out split to give it a test image
# (round(HELD_OUT_TEST * count) >= 1) and keep a training image.
MIN_HELD_OUT_CLASS = 3


@dataclass
class RunSplits:
    """A run's own train / validation / test sources of its data."""

    splits: Splits
    seed: int  # the run's: which images it held out


def run_config(run_folder: Path | None) -> dict[str, Any]:
    """The training config of a run folder ({} for none, or a run without config.json)."""
    if run_folder is not None and RunLayout(run_folder).config.is_file():
        return dict(json.loads(RunLayout(run_folder).config.read_text()))
    return {}


def run_data_options(
    run_folder: Path | None, max_unreadable_fraction: float | None = None
) -> DataOptions:
    """How the run read its data (in memory or streamed, loader workers, the share of
    unreadable files allowed, a Hugging Face dataset's columns); defaults without. A given
    ``max_unreadable_fraction`` (a command's ``--max-unreadable-fraction``) replaces the run's."""
    config = run_config(run_folder)
    if max_unreadable_fraction is None:
        max_unreadable_fraction = run_setting(
            config,
            "data",
            "max_unreadable_fraction",
            "max_unreadable_fraction",
            MAX_UNREADABLE_FRACTION,
        )
    return DataOptions(
        run_setting(config, "data", "in_memory", "data_in_memory", "auto"),
        run_setting(config, "data", "num_workers", "num_workers"),
        max_unreadable_fraction=max_unreadable_fraction,
        image_column=run_setting(config, "data", "image_column", "image_column"),
        label_column=run_setting(config, "data", "label_column", "label_column"),
    )


def run_splits(
    data: str, run_folder: Path | None, max_unreadable_fraction: float | None = None
) -> RunSplits | None:
    """The run's own train / validation / test sources when ``data`` is the data it trained
    on (``open_splits`` with its seed and validation fraction: a single-split source gives
    the very images the run held out as its test split); None otherwise.
    ``max_unreadable_fraction``: as for ``run_data_options``."""
    config = run_config(run_folder)
    if run_setting(config, "data", "source") != data:
        return None
    seed = int(run_setting(config, "run", "seed", "seed", 0))
    val_fraction = run_setting(config, "data", "val_fraction", "val_fraction", 0.0)
    options = run_data_options(run_folder, max_unreadable_fraction)
    return RunSplits(open_splits(data, val_fraction, seed, options), seed)


def evaluation_data(
    data: str, split: str, run_folder: Path | None, max_unreadable_fraction: float | None = None
) -> tuple[DataSource, str]:
    """The images to evaluate on, and a note when they are not a clean test split.

    Data with a single split is split as the training run did (its seed and validation
    fraction, from the run folder's config.json), so "test" means the run's held-out images;
    without a run folder it is evaluated whole, and the note says so.
    ``max_unreadable_fraction``: as for ``run_data_options``.
    """
    run = run_splits(data, run_folder, max_unreadable_fraction)
    if run is not None:
        splits = run.splits
        if split == "val" and splits.val is not None:
            return splits.val, ""
        if split == "val":
            return splits.test, (
                "note: the checkpoint's run held out no validation images (val_fraction 0): "
                "evaluating on its test split"
            )
        return (splits.train if split == "train" else splits.test), ""
    source = open_source(data, split, run_data_options(run_folder, max_unreadable_fraction))
    if split != "train" and _is_whole_source(data, source):
        return source, (
            f"note: {data} has no separate {split} split and {Path(str(data)).name} is not "
            "the data of this checkpoint's run folder: evaluating on all of its "
            f"{len(source)} images, training images included"
        )
    return source, ""


def channel_note(model_channels: int, data_channels: int) -> str:
    """The line that says images are converted to the model's channels ('' when they match):
    evaluation converts (``preprocess``), as it resizes, rather than refuse."""
    if model_channels == data_channels:
        return ""
    names = {1: "grey", 3: "RGB"}
    return (
        f"note: the model takes {model_channels} channel(s) and the data has {data_channels}: "
        f"converting the images to {names.get(model_channels, f'{model_channels} channels')}"
    )


def _is_whole_source(data: str, source: DataSource) -> bool:
    """Whether ``source`` is all of a single-split source (its train split is itself)."""
    if isinstance(source, StreamingFolderSource):
        return source.listing.single_split
    if not isinstance(source, InMemorySource):
        return False  # shards keep the splits they were packed with
    try:
        return same_images(source.dataset, load_dataset(data, "train"))
    except ValueError:  # no train split at all: a test-only source
        return False


@dataclass
class FrozenFeatures:
    """The features fitted on and scored on, and how the test part was chosen (``report``,
    for the JSON; ``notes``, lines for the text output; ``channel_note``, a warning)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]  # the names of the labels' class indices
    report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    channel_note: str = ""  # the images were converted to the model's channels (``channel_note``)


def frozen_features(
    model: nn.Module,
    data: str,
    run_folder: Path | None = None,
    seed: int = 0,
    batch_size: int = 256,
    max_unreadable_fraction: float | None = None,
) -> FrozenFeatures:
    """The frozen features of ``model`` on a training part and a disjoint test part of
    ``data``, computed batch by batch from the sources ``vitkit train`` reads (only the
    features are kept). The test part is the data's test split, the images the run in
    ``run_folder`` held out when ``data`` is its data, or a stratified ``HELD_OUT_TEST`` of a
    single-split source drawn with ``seed``. ``max_unreadable_fraction``: as for
    ``run_data_options``."""
    net: Any = model  # any vitkit model: its cfg names its input channels
    run = run_splits(data, run_folder, max_unreadable_fraction)
    if run is not None:
        splits, seed = run.splits, run.seed
    else:
        # Streamed whatever the folder's size: memory stays bounded, and unreadable files
        # are skipped and counted (``Splits.report``).
        streamed = replace(run_data_options(None, max_unreadable_fraction), in_memory="no")
        splits, seed = open_splits(data, 0.0, seed, streamed), seed
    classes = splits.train.info.classes
    if classes is None:
        raise ValueError(f"{data} has no labels: fitting a classifier needs class folders")
    note = channel_note(net.cfg.in_chans, splits.train.info.channels)
    listed_train, listed_test = _listed_labels(splits.train), _listed_labels(splits.test)
    if splits.held_out_test and listed_train is not None and listed_test is not None:
        _check_held_out(data, classes, listed_train, listed_test)  # before any decoding
    test_x, test_y = source_features(model, splits.test, batch_size)
    train_x, train_y = source_features(model, splits.train, batch_size)
    assert train_y is not None and test_y is not None
    if splits.held_out_test:
        _check_held_out(data, classes, train_y, test_y)  # what was readable
    skipped = splits.report()["skipped_files"]
    report: dict[str, Any] = {
        "held_out_test": splits.held_out_test,
        "test_fraction": HELD_OUT_TEST if splits.held_out_test else None,
        "split_seed": seed if splits.held_out_test else None,
        "run_test_split": run is not None,
        "train_images": len(train_y),
        "test_images": len(test_y),
        "skipped_files": skipped,
    }
    if run is not None:
        where = f"the test images of the checkpoint's run (its seed {seed})"
    elif splits.held_out_test:
        where = (
            f"{HELD_OUT_TEST:.0%} of {data} held out, stratified, seed {seed} (it has no "
            "separate test split)"
        )
    else:
        where = f"the test split of {data}"
    notes = [f"test images: {where}; fitted on {len(train_y)}, scored on {len(test_y)} images"]
    if skipped:
        notes.append(f"skipped {skipped} unreadable file(s)")
    return FrozenFeatures(train_x, train_y, test_x, test_y, list(classes), report, notes, note)


def _listed_labels(source: DataSource) -> torch.Tensor | None:
    """The labels a source knows without decoding: in memory, or a folder's listing."""
    if isinstance(source, InMemorySource):
        return source.dataset.labels
    return source.labels if isinstance(source, StreamingFolderSource) else None


def _check_held_out(
    data: str, classes: list[str], train_y: torch.Tensor, test_y: torch.Tensor
) -> None:
    """Refuse a held-out split that leaves a class without a test or a training image."""
    for labels, part in ((test_y, "test"), (train_y, "training")):
        counts = torch.bincount(labels, minlength=len(classes))
        if (counts == 0).any():
            empty = classes[int(torch.nonzero(counts == 0)[0])]
            raise ValueError(
                f"holding out {HELD_OUT_TEST:.0%} of {data} as the test split leaves class "
                f"{empty!r} without a {part} image: give every class at least "
                f"{MIN_HELD_OUT_CLASS} readable images, or a separate test split"
            )
