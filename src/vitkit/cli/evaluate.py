"""``vitkit eval``: accuracy (top-1, top-5, per class), loss and confusion matrix of a checkpoint
on a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitkit.data.base import MAX_UNREADABLE_FRACTION
from vitkit.data.datasets import differing_classes
from vitkit.data.streaming import StreamingFolderSource
from vitkit.deploy import load_for_inference
from vitkit.evaluation.inference import (
    PREDICTIONS_TOP_K,
    TTA_CHOICES,
    class_names,
    evaluate,
    write_predictions,
)
from vitkit.evaluation.splits import channel_note, evaluation_data
from vitkit.training.config import DEVICES, PRECISIONS
from vitkit.utils.files import atomic_write


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy and loss of a checkpoint on a dataset",
        description="Evaluate a checkpoint (any registered architecture) on a split of a "
        "dataset: top-1 and top-5 accuracy, the accuracy of each class, mean cross-entropy and "
        "the confusion matrix. For data with a "
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
    add_compile_flag(p)
    add_unreadable_flag(p)
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="bf16: bfloat16 autocast"
    )
    p.add_argument("--batch-size", type=int, default=512, help="(default: 512)")
    p.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default="none",
        help="test-time augmentation: 'flip' averages the logits of each image and its mirror "
        "image; 'flip_translate' adds the same for the image moved one pixel each way "
        "diagonally (as a run trained with that --tta or --test-tta scored its test split)",
    )
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="FILE.csv",
        help="also write one row per image: "
        "its path (index for images without a file), true class and top-5 classes with "
        "probabilities (path,true,pred1,prob1,...,pred5,prob5)",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="FILE.json",
        help="also write the results as JSON (accuracies, per-class accuracy, confusion "
        "matrix), and the confusion matrix as a PNG beside it (FILE_confusion.png)",
    )
    p.add_argument(
        "--confusion",
        type=Path,
        metavar="FILE.png",
        help="write the confusion matrix as a PNG here (default with --json: beside it)",
    )
    p.set_defaults(func=run)


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """The flags the commands that run a checkpoint share (``eval``, ``predict``,
    ``fewshot``, ``probe``): which model, on which device, and the allocator's setting
    (``vitkit.cli.main`` applies it)."""
    parser.add_argument(
        "--model", help="registered model name, for checkpoint formats without an architecture"
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="'auto' takes a GPU if there is one"
    )
    parser.add_argument(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        help="on Linux, let glibc hand freed memory back to the kernel after every batch, as "
        "it does by default (vitkit keeps it for reuse: fewer page faults and less system "
        "time; the process keeps its peak memory)",
    )


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """``--compile``, for the commands that call the whole model (``eval``, ``predict``)."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model with frozen weights: forward passes 1.1-1.8x faster on "
        "CPU, after a compilation of tens of seconds at the first batch (pays off over tens "
        "of thousands of images, not a few); needs a C++ compiler on CPU",
    )


def add_unreadable_flag(parser: argparse.ArgumentParser) -> None:
    """``--max-unreadable-fraction``, for the commands that read a dataset as training does."""
    parser.add_argument(
        "--max-unreadable-fraction",
        type=float,
        metavar="F",
        help="share of the data's files that may be skipped as unreadable, 0 to 1 (default: "
        f"the run's setting for its run folder's data, else {MAX_UNREADABLE_FRACTION})",
    )


def run(args: argparse.Namespace) -> int:
    model, run_folder = load_for_inference(
        args.checkpoint, args.model, args.device, compiled=args.compile
    )
    source, note = evaluation_data(args.data, args.split, run_folder, args.max_unreadable_fraction)
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
    result = evaluate(model, source, args.batch_size, args.precision, top_k=top_k, tta=args.tta)
    if args.predictions:
        first = "path" if isinstance(source, StreamingFolderSource) else "index"
        write_predictions(args.predictions, result, class_names(model), classes, first)
    print(
        f"{args.checkpoint} on {args.data} ({args.split}"
        f"{'' if args.tta == 'none' else f', {args.tta} test-time augmentation'}): "
        f"accuracy {result.accuracy:.4f} "
        f"({result.correct}/{result.count}), top-{result.top_k} accuracy "
        f"{result.top_k_accuracy:.4f} ({result.top_k_correct}/{result.count}), "
        f"loss {result.loss:.4f}"
    )
    per_class = result.per_class_accuracy
    images = result.confusion.sum(dim=1).tolist()
    right = result.confusion.diagonal().tolist()
    width = max(len(n) for n in classes)
    print("accuracy of each class (its images predicted right):")
    for name, accuracy, r, n in zip(classes, per_class, right, images, strict=True):
        shown = "  -   " if accuracy is None else f"{accuracy:.4f}"
        print(f"{name.rjust(width)} {shown} ({r}/{n})")
    print("confusion matrix (rows: true class, columns: predicted):")
    width = max(len(str(result.confusion.max().item())), width)
    print(" " * width + " " + " ".join(n.rjust(width) for n in classes))
    for name, row in zip(classes, result.confusion.tolist(), strict=True):
        print(name.rjust(width) + " " + " ".join(str(c).rjust(width) for c in row))
    if args.json:
        report = dict(
            checkpoint=str(args.checkpoint),
            data=str(args.data),
            split=args.split,
            tta=args.tta,
            count=result.count,
            accuracy=result.accuracy,
            top_k=result.top_k,
            top_k_accuracy=result.top_k_accuracy,
            loss=result.loss,
            classes=classes,
            per_class_accuracy=dict(zip(classes, per_class, strict=True)),
            confusion=result.confusion.tolist(),
        )
        text = json.dumps(report, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
    figure = args.confusion or (
        args.json.with_name(f"{args.json.stem}_confusion.png") if args.json else None
    )
    if figure is not None:
        # The one place eval draws: matplotlib is imported only then.
        from vitkit.analysis.figures import confusion_matrix_figure, save_figure

        save_figure(confusion_matrix_figure(result.confusion.numpy(), classes), figure)
    return 0
