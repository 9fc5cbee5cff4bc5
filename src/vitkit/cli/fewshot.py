"""``vitkit fewshot``: the paper's few-shot linear evaluation of a checkpoint's frozen features.

Also home of what ``vitkit probe`` shares with it: loading the checkpoint and computing the
frozen features of a training part (fitted on) and a test part no fitting saw (scored on):
the data's test split, the run's own held-out images, or a stratified ``HELD_OUT_TEST`` held
out of a single-split source as ``vitkit train`` holds it out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from vitkit.cli.evaluate import (
    add_inference_flags,
    channel_note,
    load_for_inference,
    run_splits,
)
from vitkit.data.sources import (
    HELD_OUT_TEST,
    DataOptions,
    DataSource,
    InMemorySource,
    open_splits,
)
from vitkit.data.streaming import StreamingFolderSource
from vitkit.evaluation import fewshot_protocol
from vitkit.evaluation.features import source_features
from vitkit.evaluation.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS

# A class needs this many readable images for the held-out split to give it a test image
# (round(HELD_OUT_TEST * count) >= 1) and keep a training image.
MIN_HELD_OUT_CLASS = 3
STREAM_FOLDERS = DataOptions(in_memory="no")


def add_feature_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="any checkpoint load_pretrained reads, or a run folder (its best)",
    )
    parser.add_argument(
        "--data", required=True, help="'digits' (shipped) or a path: image folder, shards, "
        "idx / CIFAR folder or .npz; its train split is fitted on, its test split scored (a "
        "source with one split: 20%% of it is held out as the test split, or the run's own "
        "test images when it is the checkpoint's run's data)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the held-out test split of single-split data (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default: 256)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_inference_flags(parser)


@dataclass
class FrozenFeatures:
    """The features fitted on and scored on, and how the test part was chosen (``report``,
    for the JSON; ``notes``, lines for the text output)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def frozen_features(args: argparse.Namespace) -> FrozenFeatures:
    """The frozen features of ``args.checkpoint`` on a training part and a disjoint test part
    of ``args.data``, computed batch by batch from the sources ``vitkit train`` reads (only
    the features are kept); notes on channels and the test part go to stderr."""
    model, run_folder = load_for_inference(args, need_head=False)
    run = run_splits(args.data, run_folder)
    if run is not None:
        splits, seed = run.splits, run.seed
    else:
        # Streamed whatever the folder's size: memory stays bounded, and unreadable files
        # are skipped and counted (``Splits.report``).
        splits, seed = open_splits(args.data, 0.0, args.seed, STREAM_FOLDERS), args.seed
    classes = splits.train.info.classes
    if classes is None:
        raise ValueError(f"{args.data} has no labels: fitting a classifier needs class folders")
    note = channel_note(model.cfg.in_chans, splits.train.info.channels)
    if note:
        print(note, file=sys.stderr)
    listed_train, listed_test = _listed_labels(splits.train), _listed_labels(splits.test)
    if splits.held_out_test and listed_train is not None and listed_test is not None:
        _check_held_out(args.data, classes, listed_train, listed_test)  # before any decoding
    test_x, test_y = source_features(model, splits.test, args.batch_size)
    train_x, train_y = source_features(model, splits.train, args.batch_size)
    assert train_y is not None and test_y is not None
    if splits.held_out_test:
        _check_held_out(args.data, classes, train_y, test_y)  # what was readable
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
            f"{HELD_OUT_TEST:.0%} of {args.data} held out, stratified, seed {seed} (it has no "
            "separate test split)"
        )
    else:
        where = f"the test split of {args.data}"
    notes = [f"test images: {where}; fitted on {len(train_y)}, scored on {len(test_y)} images"]
    if skipped:
        notes.append(f"skipped {skipped} unreadable file(s)")
    return FrozenFeatures(train_x, train_y, test_x, test_y, report, notes)


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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fewshot",
        help="few-shot linear evaluation of frozen features (the paper's, big_vision's)",
        description="Closed-form ridge regression (L2 weight 2^10) on the whitened frozen "
        "pre-logits features of N training images per class, accuracy on the whole test "
        "split (data with one split: on 20% held out of it); mean and standard deviation over seeds, drawn as big_vision draws them.",
    )
    add_feature_flags(p)
    p.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=list(DEFAULT_SHOTS),
        help="training images per class (default: %(default)s)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument(
        "--l2-reg", type=float, default=DEFAULT_L2_REG, help="ridge weight (default: 2^10)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    features = frozen_features(args)
    results = fewshot_protocol(
        features.train_x, features.train_y, features.test_x, features.test_y, args.shots,
        range(args.seeds), args.l2_reg,
    )  # fmt: skip
    dim = int(features.train_x.shape[1])
    if args.json:
        info = {"checkpoint": str(args.checkpoint), "data": str(args.data), "feature_dim": dim}
        info |= {"seeds": args.seeds, "l2_reg": args.l2_reg, **features.report}
        print(json.dumps(info | {"shots": {str(n): r for n, r in results.items()}}, indent=2))
        return 0
    print(
        f"{args.checkpoint} on {args.data}: few-shot accuracy over {args.seeds} seeds "
        f"({dim}-d features, L2 {args.l2_reg:g})"
    )
    for note in features.notes:
        print(note)
    for n, r in results.items():
        print(f"{n:>4}-shot: {r['mean']:.4f} ± {r['std']:.4f}")
    return 0
