"""``vitkit eval``: accuracy, loss and confusion matrix of a checkpoint on a dataset."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitkit.analysis.inputs import locate_checkpoint
from vitkit.checkpoints import load_pretrained
from vitkit.data import load_dataset
from vitkit.data.base import MAX_UNREADABLE_FRACTION
from vitkit.data.datasets import differing_classes
from vitkit.data.sources import (
    DataOptions,
    DataSource,
    InMemorySource,
    Splits,
    open_source,
    open_splits,
    same_images,
)
from vitkit.data.streaming import StreamingFolderSource
from vitkit.deploy import OnnxClassifier, is_deployed, load_deployed
from vitkit.models.pretrained import PretrainedModel
from vitkit.training import Evaluation, evaluate
from vitkit.training.config import DEVICES, PRECISIONS, read_config_file
from vitkit.training.distributed import choose_device
from vitkit.training.evaluate import class_names
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout

PREDICTIONS_TOP_K = 5  # classes per image in --predictions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="accuracy and loss of a checkpoint on a dataset",
        description="Evaluate a checkpoint (any registered architecture) on a split of a "
        "dataset: accuracy, mean cross-entropy and the confusion matrix. For data with a "
        "single split, a checkpoint of a run folder is evaluated on that run's own held-out "
        "images.",
    )  # fmt: skip
    p.add_argument(
        "checkpoint", help="any checkpoint load_pretrained reads, or a run folder (its best)"
    )
    p.add_argument(
        "--data", required=True, help="'digits' (shipped) or a path: image folder, idx / CIFAR "
        "folder or .npz",
    )  # fmt: skip
    p.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="(default: test)"
    )
    add_inference_flags(p)
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="bf16: bfloat16 autocast"
    )
    p.add_argument("--batch-size", type=int, default=512, help="(default: 512)")
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="FILE.csv",
        help="also write one row per image: "
        "its path (index for images without a file), true class and top-5 classes with "
        "probabilities (path,true,pred1,prob1,...,pred5,prob5)",
    )
    p.set_defaults(func=run)


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """The flags ``eval`` and ``predict`` share: which model, on which device."""
    parser.add_argument(
        "--model", help="registered model name, for checkpoint formats without an architecture"
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="'auto' takes a GPU if there is one"
    )


def load_for_inference(
    args: argparse.Namespace, need_head: bool = True
) -> tuple[OnnxClassifier | PretrainedModel, Path | None]:
    """The model of any checkpoint or run folder (its best checkpoint, else its last), on the
    chosen device, with a classification head if ``need_head``; and its run folder, if any.
    Without ``need_head`` the caller wants features, which an exported file does not give."""
    model: OnnxClassifier | PretrainedModel
    if is_deployed(args.checkpoint):  # `vitkit export`'s .onnx (run on the CPU) or int8
        if not need_head:
            raise ValueError(
                f"{args.checkpoint} is an exported model (`vitkit export`), which gives class "
                "scores only, not the features this command needs: give the checkpoint it was "
                "exported from"
            )
        model, run_folder = load_deployed(args.checkpoint), None
    else:
        checkpoint, run_folder = locate_checkpoint(args.checkpoint)
        model = load_pretrained(checkpoint, args.model)
    if need_head and not model.cfg.num_classes:
        raise ValueError(
            f"{args.checkpoint} has no classification head (num_classes 0): it gives features, "
            "not classes; fine-tune it with `vitkit finetune --from` to classify"
        )
    return model.to(choose_device(args.device)), run_folder


@dataclass
class RunSplits:
    splits: Splits
    seed: int  # the run's: which images it held out


def run_config(run_folder: Path | None) -> dict[str, Any]:
    """The training config of a run folder, nested (the flat keys of earlier versions mapped);
    {} for none, or a run without config.json."""
    if run_folder is not None and RunLayout(run_folder).config.is_file():
        path = RunLayout(run_folder).config
        return read_config_file(path, json.loads(path.read_text()))
    return {}


def run_data_options(run_folder: Path | None) -> DataOptions:
    """How the run read its data (in memory or streamed, loader workers); defaults without."""
    data = run_config(run_folder).get("data", {})
    return DataOptions(
        data.get("in_memory", "auto"),
        data.get("num_workers"),
        max_unreadable_fraction=data.get("max_unreadable_fraction", MAX_UNREADABLE_FRACTION),
    )


def run_splits(data: str, run_folder: Path | None) -> RunSplits | None:
    """The run's own train / validation / test sources when ``data`` is the data it trained
    on (``open_splits`` with its seed and validation fraction: a single-split source gives
    the very images the run held out as its test split); None otherwise."""
    config = run_config(run_folder)
    if config.get("data", {}).get("source") != data:
        return None
    seed = int(config.get("run", {}).get("seed", 0))
    options = run_data_options(run_folder)
    val_fraction = config["data"].get("val_fraction", 0.0)
    return RunSplits(open_splits(data, val_fraction, seed, options), seed)


def evaluation_data(data: str, split: str, run_folder: Path | None) -> tuple[DataSource, str]:
    """The images to evaluate on, and a note when they are not a clean test split.

    Data with a single split is split as the training run did (its seed and validation
    fraction, from the run folder's config.json), so "test" means the run's held-out images;
    without a run folder it is evaluated whole, and the note says so.
    """
    run = run_splits(data, run_folder)
    if run is not None:
        splits = run.splits
        chosen = {"train": splits.train, "val": splits.val or splits.test, "test": splits.test}
        return chosen[split], ""
    source = open_source(data, split, run_data_options(run_folder))
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


def write_predictions(
    path: Path,
    result: Evaluation,
    model_classes: list[str],
    data_classes: list[str],
    first: str,
) -> None:
    """``result.predictions`` as a CSV file (atomically): ``first`` (path or index), the true
    class (the data's name), then ``pred1, prob1, ...`` (the model's names)."""
    top_k = max((len(p.top) for p in result.predictions), default=PREDICTIONS_TOP_K)
    header = [first, "true"] + [f"{c}{i}" for i in range(1, top_k + 1) for c in ("pred", "prob")]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for p in result.predictions:
                ranked = [v for i, prob in p.top for v in (model_classes[i], f"{prob:.6f}")]
                writer.writerow([p.name, data_classes[p.label], *ranked])

    atomic_write(path, write)


def run(args: argparse.Namespace) -> int:
    model, run_folder = load_for_inference(args)
    source, note = evaluation_data(args.data, args.split, run_folder)
    for line in (note, channel_note(model.cfg.in_chans, source.info.channels)):
        if line:
            print(line, file=sys.stderr)
    classes = source.info.classes or []
    names = model.cfg.extra.get("classes")
    if isinstance(names, list) and [str(n) for n in names] != classes:
        # Accuracy would compare unrelated labels: say so, naming both sides.
        print(
            f"warning: {differing_classes(names, classes, 'the model', 'the data')}",
            file=sys.stderr,
        )
    top_k = PREDICTIONS_TOP_K if args.predictions else 0
    result = evaluate(model, source, args.batch_size, args.precision, top_k=top_k)
    if args.predictions:
        first = "path" if isinstance(source, StreamingFolderSource) else "index"
        write_predictions(args.predictions, result, class_names(model), classes, first)
    print(
        f"{args.checkpoint} on {args.data} ({args.split}): accuracy {result.accuracy:.4f} "
        f"({result.correct}/{result.count}), loss {result.loss:.4f}"
    )
    print("confusion matrix (rows: true class, columns: predicted):")
    width = max(len(str(result.confusion.max().item())), *(len(n) for n in classes))
    print(" " * width + " " + " ".join(n.rjust(width) for n in classes))
    for name, row in zip(classes, result.confusion.tolist(), strict=True):
        print(name.rjust(width) + " " + " ".join(str(c).rjust(width) for c in row))
    return 0
