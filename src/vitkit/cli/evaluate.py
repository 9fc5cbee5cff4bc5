"""``vitkit eval``: accuracy, loss and confusion matrix of a checkpoint on a dataset."""

from __future__ import annotations

import argparse

from torch import nn

from vitkit.checkpoints import load_pretrained
from vitkit.data import load_dataset
from vitkit.training import evaluate
from vitkit.training.config import DEVICES, PRECISIONS
from vitkit.training.distributed import choose_device


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="accuracy and loss of a checkpoint on a dataset",
        description="Evaluate a checkpoint (any registered architecture) on a split of a "
        "dataset: accuracy, mean cross-entropy and the confusion matrix.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="any checkpoint load_pretrained reads")
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
    p.set_defaults(func=run)


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """The flags ``eval`` and ``predict`` share: which model, on which device."""
    parser.add_argument(
        "--model", help="registered model name, for checkpoint formats without an architecture"
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="'auto' takes a GPU if there is one"
    )


def load_for_inference(args: argparse.Namespace) -> nn.Module:
    model = load_pretrained(args.checkpoint, args.model)
    return model.to(choose_device(args.device))


def run(args: argparse.Namespace) -> int:
    model = load_for_inference(args)
    dataset = load_dataset(args.data, args.split)
    result = evaluate(model, dataset, args.batch_size, args.precision)
    print(
        f"{args.checkpoint} on {args.data} ({args.split}): accuracy {result.accuracy:.4f} "
        f"({result.correct}/{result.count}), loss {result.loss:.4f}"
    )
    print("confusion matrix (rows: true class, columns: predicted):")
    names = dataset.classes
    width = max(len(str(result.confusion.max().item())), *(len(n) for n in names))
    print(" " * width + " " + " ".join(n.rjust(width) for n in names))
    for name, row in zip(names, result.confusion.tolist(), strict=True):
        print(name.rjust(width) + " " + " ".join(str(c).rjust(width) for c in row))
    return 0
