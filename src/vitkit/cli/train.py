"""``vitkit train``, ``finetune``, ``eval`` and ``predict``.

The options of ``train`` and ``finetune`` are generated from ``TrainConfig``'s fields (and
``AugmentConfig``'s), so every setting is a flag, a TOML key and a line of ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitkit.checkpoints import load_pretrained
from vitkit.data import AugmentConfig, load_dataset
from vitkit.deploy import is_deployed, load_deployed
from vitkit.training import (
    FINETUNE_DEFAULTS,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    predict,
    train,
)
from vitkit.training.config import DEFAULT_AUGMENT, DEVICES, PRECISIONS, merge, read_toml
from vitkit.training.distributed import choose_device

AUGMENT_HELP = {
    "random_resized_crop": "random-resized (Inception) crop instead of a plain resize",
    "crop_scale": "MIN MAX area fraction of the random-resized crop",
    "hflip": "random horizontal flips",
    "randaugment": "RandAugment NUM_OPS MAGNITUDE (magnitude on kornia's 0..30 scale)",
    "mixup": "mixup's Beta alpha (0 = off)",
    "cutmix": "cutmix's Beta alpha (0 = off)",
    "label_smoothing": "label smoothing of the targets",
}
PAIR_METAVARS = {
    "betas": ("BETA1", "BETA2"),
    "crop_scale": ("MIN", "MAX"),
    "randaugment": ("NUM_OPS", "MAGNITUDE"),
}


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _add_field(group: argparse._ArgumentGroup, field: dataclasses.Field, hint: Any,
               help: str, default: Any) -> None:  # fmt: skip
    """One flag for one config field, typed from its annotation."""
    flag = "--" + field.name.replace("_", "-")
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS)
    if "default" not in help:
        help = f"{help} (default: {default})"
    if base is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help, **kwargs)
    elif typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        group.add_argument(flag, nargs=2, type=item, metavar=PAIR_METAVARS.get(field.name),
                           help=help, **kwargs)  # fmt: skip
    elif typing.get_origin(base) is typing.Literal:
        group.add_argument(flag, choices=typing.get_args(base), help=help, **kwargs)
    else:
        kind = _parse_optional(base) if optional else base
        group.add_argument(flag, type=kind, help=help + (" ('none' to unset)" if optional else ""),
                           **kwargs)  # fmt: skip


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (flags override it; augmentations "
        "under [augment]); see the resolved config.json of any run for every key",
    )  # fmt: skip
    for cls, title, skip in (
        (TrainConfig, "training options", {"augment", "init_from"}),
        (AugmentConfig, "augmentation options ([augment] in the TOML file)", set()),
    ):
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in skip:
                continue
            help = field.metadata.get("help") or AUGMENT_HELP.get(field.name, field.name)
            default = {**DEFAULT_AUGMENT, **defaults}.get(field.name, field.default)
            _add_field(group, field, hints[field.name], help, default)


def register(subparsers: argparse._SubParsersAction) -> None:
    train_parser = subparsers.add_parser(
        "train",
        help="train a ViT from scratch (default: a small ViT on the shipped digits)",
        description="Train a ViT with the paper's pre-training recipe (Adam, decoupled weight "
        "decay, warm-up then decay, gradient clipping). With no options: a small ViT on the "
        "digits shipped with vitkit. Under torchrun, trains with DistributedDataParallel.",
    )
    train_parser.add_argument(
        "--resume", type=Path, metavar="DIR",
        help="continue the run in DIR (training or fine-tuning) from its last checkpoint, "
        "with its own config.json; takes no other option",
    )  # fmt: skip
    add_config_flags(train_parser, {})
    train_parser.set_defaults(func=run_train, preset={})

    finetune_parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on new data (new head, optionally a higher resolution)",
        description="Fine-tune any checkpoint load_pretrained reads, with the paper's recipe: "
        "a new zero-initialised head, SGD with momentum 0.9, gradient clipping at global norm "
        "1, cosine decay after a warm-up. --img-size above the checkpoint's resizes the "
        "position embeddings. Resume with `vitkit train --resume DIR`.",
    )
    finetune_parser.add_argument(
        "--from", dest="init_from", required=True, metavar="CKPT",
        help="the checkpoint to start from (vitkit, official .npz, ...)",
    )  # fmt: skip
    add_config_flags(finetune_parser, FINETUNE_DEFAULTS)
    finetune_parser.set_defaults(func=run_train, preset=FINETUNE_DEFAULTS)

    eval_parser = subparsers.add_parser(
        "eval", help="accuracy and loss of a checkpoint on a dataset",
        description="Evaluate a checkpoint on a split of a dataset: accuracy, mean "
        "cross-entropy and the confusion matrix.",
    )  # fmt: skip
    eval_parser.add_argument("checkpoint", help="any checkpoint load_pretrained reads")
    eval_parser.add_argument(
        "--data", required=True, help="'digits' (shipped) or a path: image folder, idx / CIFAR "
        "folder or .npz",
    )  # fmt: skip
    eval_parser.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="(default: test)"
    )
    add_inference_flags(eval_parser)
    eval_parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="bf16: bfloat16 autocast"
    )
    eval_parser.add_argument("--batch-size", type=int, default=512, help="(default: 512)")
    eval_parser.set_defaults(func=run_eval)

    predict_parser = subparsers.add_parser(
        "predict", help="top-k classes of images",
        description="Print the top-k class names and probabilities of each image.",
    )  # fmt: skip
    predict_parser.add_argument("checkpoint", help="any checkpoint load_pretrained reads")
    predict_parser.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="image files Pillow reads"
    )
    predict_parser.add_argument(
        "--top-k", type=int, default=5, help="how many classes to show (default: 5)"
    )
    add_inference_flags(predict_parser)
    predict_parser.set_defaults(func=run_predict)


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="registered model name, for checkpoint formats without an architecture"
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="'auto' takes a GPU if there is one"
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults of the subcommand, then the TOML file, then the flags."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    augment_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    given = vars(args)
    flags = {k: v for k, v in given.items() if k in train_fields}
    flags["augment"] = {k: v for k, v in given.items() if k in augment_fields}
    values = dict(args.preset)
    if args.config is not None:
        values = merge(values, read_toml(args.config))
    return TrainConfig.from_dict(merge(values, flags))


def run_train(args: argparse.Namespace) -> int:
    resume = getattr(args, "resume", None)
    if resume is not None:
        given = {k for k, v in vars(args).items() if v is not None}
        others = sorted(given - {"resume", "func", "preset", "command"})
        if others:
            raise ValueError(
                "--resume continues a run with the settings of its config.json; drop the "
                f"other options ({', '.join(others)})"
            )
    try:  # train() prints the test accuracy and the run folder
        train(resume=resume) if resume is not None else train(config_from_args(args))
    except TrainingDiverged as err:
        print(f"vitkit {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


def load_for_inference(args: argparse.Namespace) -> Any:
    if is_deployed(args.checkpoint):  # `vitkit export`'s .onnx (run on the CPU) or int8
        model = load_deployed(args.checkpoint)
    else:
        model = load_pretrained(args.checkpoint, args.model)
    return model.to(choose_device(args.device))


def run_eval(args: argparse.Namespace) -> int:
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


def read_image(path: Path, channels: int) -> torch.Tensor:
    """One image file as uint8 (1, channels, H, W)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("L" if channels == 1 else "RGB"))
    except OSError as err:
        raise ValueError(f"{path} is not an image Pillow can read ({err})") from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0)


def run_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    model = load_for_inference(args)
    for path in args.images:
        (top,) = predict(model, read_image(path, model.cfg.in_chans), args.top_k)
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in top))
    return 0
