"""``vitkit fewshot``: the paper's few-shot linear evaluation of a checkpoint's frozen features.

Also home of what ``vitkit probe`` shares with it: the flags, and the frozen features of the
checkpoint (``vitkit.evaluation.splits.frozen_features``) with their note printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vitkit.cli.evaluate import add_inference_flags, add_unreadable_flag
from vitkit.deploy import load_for_inference
from vitkit.evaluation import fewshot_head, fewshot_indices, fewshot_protocol
from vitkit.evaluation.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS
from vitkit.evaluation.probe import with_linear_head
from vitkit.evaluation.splits import FrozenFeatures
from vitkit.evaluation.splits import frozen_features as features_of
from vitkit.models.pretrained import PretrainedModel


def add_feature_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="any checkpoint load_pretrained reads, or a run folder (its best)",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="'digits' (shipped) or a path: image folder, shards, "
        "idx / CIFAR folder, .npz or a Hugging Face dataset; its train split is fitted on, its test split scored (a "
        "source with one split: 20%% of it is held out as the test split, or the run's own "
        "test images when it is the checkpoint's run's data)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the held-out test split of single-split data (default: 0)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default: 256)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_inference_flags(parser)
    add_unreadable_flag(parser)


def frozen_features(args: argparse.Namespace) -> FrozenFeatures:
    """The frozen features of ``args.checkpoint`` on ``args.data`` (``features_of``); the note
    on channels goes to stderr."""
    model, run_folder = load_for_inference(
        args.checkpoint, args.model, args.device, need_head=False
    )
    features = features_of(
        model, args.data, run_folder, args.seed, args.batch_size, args.max_unreadable_fraction
    )
    if features.channel_note:
        print(features.channel_note, file=sys.stderr)
    return features


def add_save_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--save",
        type=Path,
        metavar="OUT",
        help=f"save the frozen model with {what} as its head (a folder, or one file ending in "
        ".safetensors) for predict, eval and export",
    )


def save_with_head(
    args: argparse.Namespace, weight: torch.Tensor, bias: torch.Tensor, classes: list[str]
) -> None:
    """The checkpoint's model with the head ``features @ weight + bias`` (its ``classes``)
    at ``args.save``."""
    model, _ = load_for_inference(args.checkpoint, args.model, args.device, need_head=False)
    assert isinstance(model, PretrainedModel)  # exported files give no features (refused)
    saved = with_linear_head(model, weight.float(), bias.float(), classes)
    print(
        f"saved the model with its new head to {saved.save_pretrained(args.save)}", file=sys.stderr
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
    add_save_flag(p, "the ridge classifier of the largest --shots count (seed 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    features = frozen_features(args)
    results = fewshot_protocol(
        features.train_x,
        features.train_y,
        features.test_x,
        features.test_y,
        args.shots,
        range(args.seeds),
        args.l2_reg,
    )
    dim = int(features.train_x.shape[1])
    if args.save:
        shots, classes = max(args.shots), features.classes
        chosen = fewshot_indices(features.train_y, shots, seed=0, num_classes=len(classes))
        weight, bias = fewshot_head(
            features.train_x[chosen], features.train_y[chosen], len(classes), args.l2_reg
        )
        save_with_head(args, weight, bias, classes)
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
