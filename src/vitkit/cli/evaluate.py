"""``vitkit eval``: accuracy, loss and confusion matrix of a checkpoint on a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitkit.data.datasets import differing_classes
from vitkit.data.streaming import StreamingFolderSource
from vitkit.deploy import load_for_inference
from vitkit.evaluation.inference import (
    PREDICTIONS_TOP_K,
    class_names,
    evaluate,
    write_predictions,
)
from vitkit.evaluation.splits import channel_note, evaluation_data
from vitkit.training.config import DEVICES, PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy and loss of a checkpoint on a dataset",
        description="Evaluate a checkpoint (any registered architecture) on a split of a "
        "dataset: accuracy, mean cross-entropy and the confusion matrix. For data with a "
        "single split, a checkpoint of a run folder is evaluated on that run's own held-out "
        "images.",
    )
    p.add_argument(
        "checkpoint", help="any checkpoint load_pretrained reads, or a run folder (its best)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="'digits' (shipped) or a path: image folder, idx / CIFAR folder, .npz or a Hugging Face dataset (docs/data.md)",
    )
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


def run(args: argparse.Namespace) -> int:
    model, run_folder = load_for_inference(args.checkpoint, args.model, args.device)
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
