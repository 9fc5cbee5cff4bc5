"""``vitkit probe``: linear-probe or k-NN accuracy of a checkpoint's frozen features."""

from __future__ import annotations

import argparse
import dataclasses
import json

from vitkit.cli.fewshot import add_feature_flags, frozen_features
from vitkit.evaluation import knn_classifier, linear_probe
from vitkit.evaluation.probe import KNN_VOTES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="linear probe (logistic regression) or k-NN on frozen features",
        description="Fit on the frozen pre-logits features of the train split, report the "
        "accuracy on the test split. linear: logistic regression on standardised features, "
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    train_x, train_y, test_x, test_y = frozen_features(args)
    if args.method == "linear":
        result = linear_probe(train_x, train_y, test_x, test_y, args.weight_decay, args.max_iter)
        settings = {"weight_decay": args.weight_decay, "max_iter": args.max_iter}
    else:
        result = knn_classifier(train_x, train_y, test_x, test_y, args.k, args.vote)
        settings = {"k": args.k, "vote": args.vote}
    if args.json:
        info = {"checkpoint": str(args.checkpoint), "data": str(args.data)}
        info |= {"method": args.method, **settings, **dataclasses.asdict(result)}
        print(json.dumps(info, indent=2))
        return 0
    detail = (
        f"{result.iterations} L-BFGS iterations, "
        + ("converged" if result.converged else "NOT converged")
        + f", train accuracy {result.train_accuracy:.4f}"
        if args.method == "linear"
        else f"k={args.k}, {args.vote} vote"
    )
    print(
        f"{args.checkpoint} on {args.data}: {args.method} accuracy {result.accuracy:.4f} ({detail})"
    )
    return 0
