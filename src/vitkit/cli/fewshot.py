"""``vitkit fewshot``: the paper's few-shot linear evaluation of a checkpoint's frozen features.

Also home of what ``vitkit probe`` shares with it: loading the checkpoint and computing the
frozen features of a dataset's train split (fitted on) and test split (scored on).
"""

from __future__ import annotations

import argparse
import json

import torch

from vitkit.cli.evaluate import add_inference_flags, load_for_inference
from vitkit.data import load_dataset
from vitkit.evaluation import extract_features, fewshot_protocol
from vitkit.evaluation.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS


def add_feature_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="any checkpoint load_pretrained reads, or a run folder (its best)",
    )
    parser.add_argument(
        "--data", required=True, help="'digits' (shipped) or a path: image folder, idx / CIFAR "
        "folder or .npz; its train split is fitted on, its test split scored",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default: 256)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_inference_flags(parser)


def frozen_features(
    args: argparse.Namespace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, train labels, test features, test labels) of ``args.checkpoint``."""
    model, _ = load_for_inference(args, need_head=False)
    train_set, test_set = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    return (
        extract_features(model, train_set, args.batch_size),
        train_set.labels,
        extract_features(model, test_set, args.batch_size),
        test_set.labels,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fewshot",
        help="few-shot linear evaluation of frozen features (the paper's, big_vision's)",
        description="Closed-form ridge regression (L2 weight 2^10) on the whitened frozen "
        "pre-logits features of N training images per class, accuracy on the whole test "
        "split; mean and standard deviation over seeds, drawn as big_vision draws them.",
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
    train_x, train_y, test_x, test_y = frozen_features(args)
    results = fewshot_protocol(
        train_x, train_y, test_x, test_y, args.shots, range(args.seeds), args.l2_reg
    )
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "data": str(args.data),
                    "feature_dim": int(train_x.shape[1]),
                    "seeds": args.seeds,
                    "l2_reg": args.l2_reg,
                    "shots": {str(n): r for n, r in results.items()},
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{args.checkpoint} on {args.data}: few-shot accuracy over {args.seeds} seeds "
        f"({train_x.shape[1]}-d features, L2 {args.l2_reg:g})"
    )
    for n, r in results.items():
        print(f"{n:>4}-shot: {r['mean']:.4f} ± {r['std']:.4f}")
    return 0
