"""``vitkit probe``: linear-probe or k-NN accuracy of a checkpoint's frozen features."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from vitkit.cli.fewshot import add_feature_flags, add_save_flag, frozen_features, save_with_head
from vitkit.evaluation import knn_classifier
from vitkit.evaluation.probe import KNN_VOTES, linear_probe_head


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="linear probe (logistic regression) or k-NN on frozen features",
        description="Fit on the frozen pre-logits features of the train split, report the "
        "accuracy on the test split (data with one split: on 20% held out of it). linear: logistic regression on standardised features, "
        "full-batch L-BFGS to convergence. knn: cosine similarity, the k nearest vote.",
    )
    add_feature_flags(p)
    p.add_argument(
        "--method", choices=("linear", "knn"), default="linear", help="(default: linear)"
    )
    p.add_argument(
        "--weight-decay", type=float, default=1e-4, help="linear: L2 weight (default: 1e-4)"
    )
    p.add_argument(
        "--max-iter", type=int, default=1000, help="linear: L-BFGS iterations (default: 1000)"
    )
    p.add_argument("-k", type=int, default=20, help="knn: neighbours (default: 20)")
    p.add_argument(
        "--vote",
        choices=KNN_VOTES,
        default="weighted",
        help="knn: weighted by exp(similarity / 0.07), or one vote each (default: weighted)",
    )
    add_save_flag(p, "the fitted probe (--method linear)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    features = frozen_features(args)
    train_x, train_y, test_x, test_y = (
        features.train_x,
        features.train_y,
        features.test_x,
        features.test_y,
    )
    if args.save and args.method != "linear":
        raise ValueError("--save keeps a linear head: use it with --method linear")
    if args.method == "linear":
        result, weight, bias = linear_probe_head(
            train_x, train_y, test_x, test_y, args.weight_decay, args.max_iter
        )
        if args.save:
            save_with_head(args, weight, bias, features.classes)
        settings: dict[str, object] = {
            "weight_decay": args.weight_decay,
            "max_iter": args.max_iter,
        }
    else:
        k_used = min(args.k, len(train_x))
        if k_used < args.k:
            print(
                f"warning: -k {args.k} is more than the {len(train_x)} training images: all "
                f"{k_used} vote",
                file=sys.stderr,
            )
        result = knn_classifier(train_x, train_y, test_x, test_y, k_used, args.vote)
        settings = {"k": args.k, "k_used": k_used, "vote": args.vote}
    if args.json:
        info: dict[str, object] = {"checkpoint": str(args.checkpoint), "data": str(args.data)}
        info |= {"method": args.method, **settings, **features.report}
        print(json.dumps(info | dataclasses.asdict(result), indent=2))
        return 0
    detail = (
        f"{result.iterations} L-BFGS iterations, "
        + ("converged" if result.converged else "NOT converged")
        + f", train accuracy {result.train_accuracy:.4f}"
        if args.method == "linear"
        else f"k={settings['k_used']}, {args.vote} vote"
    )
    print(
        f"{args.checkpoint} on {args.data}: {args.method} accuracy {result.accuracy:.4f} ({detail})"
    )
    for note in features.notes:
        print(note)
    return 0
