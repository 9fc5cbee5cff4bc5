"""``vitkit train`` and ``finetune``.

The options of ``train`` and ``finetune`` are generated from ``TrainConfig``'s fields (and
``AugmentConfig``'s), so every setting is a flag, a TOML key and a line of ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vitkit.cli import is_main_rank
from vitkit.data import AugmentConfig
from vitkit.training import (
    FINETUNE_DEFAULTS,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    train,
)
from vitkit.training.config import DEFAULT_AUGMENT, merge, read_toml
from vitkit.training.loop import RESUME_OPTIONS, Progress
from vitkit.training.recipes import BIT_FIXED, bit_config

AUGMENT_HELP = {
    "random_resized_crop": "random-resized (Inception) crop instead of a plain resize",
    "crop_scale": "MIN MAX area fraction of the random-resized crop",
    "crop_ratio": "MIN MAX aspect ratio (width / height) of the random-resized crop",
    "hflip": "random horizontal flips",
    "randaugment": "RandAugment NUM_OPS MAGNITUDE (magnitude on kornia's 0..30 scale)",
    "mixup": "mixup's Beta alpha (0 = off)",
    "cutmix": "cutmix's Beta alpha (0 = off)",
    "label_smoothing": "label smoothing of the targets",
}
PAIR_METAVARS = {
    "betas": ("BETA1", "BETA2"),
    "crop_scale": ("MIN", "MAX"),
    "crop_ratio": ("MIN", "MAX"),
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
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        group.add_argument(flag, nargs="*", type=item, help=help, **kwargs)
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


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def add_config_flags(
    parser: argparse.ArgumentParser, defaults: dict[str, Any], hidden: frozenset[str] = frozenset()
) -> None:
    """A flag for each config field but ``init_from`` and those in ``hidden`` (which the
    command sets another way)."""
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (flags override it; augmentations "
        "under [augment]); see the resolved config.json of any run for every key",
    )  # fmt: skip
    for cls, title, skip in (
        (TrainConfig, "training options", {"augment", "init_from", *hidden}),
        (AugmentConfig, "augmentation options ([augment] in the TOML file)", set()),
    ):
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in skip:
                continue
            help = field.metadata.get("help") or AUGMENT_HELP.get(field.name, field.name)
            default = {**DEFAULT_AUGMENT, **defaults}.get(field.name, _field_default(field))
            _add_field(group, field, hints[field.name], help, default)


def register(subparsers: argparse._SubParsersAction) -> None:
    train_parser = subparsers.add_parser(
        "train",
        help="train a ViT from scratch (default: a small ViT on the shipped digits)",
        description="Train a ViT with the paper's pre-training recipe (Adam, decoupled weight "
        "decay, warm-up then decay, gradient clipping). With no options: a small ViT on the "
        "digits shipped with vitkit. Under torchrun, trains with DistributedDataParallel or, "
        "with --parallel fsdp, FSDP (sharded model, gradients and optimizer state).",
    )
    train_parser.add_argument(
        "--resume", type=Path, metavar="DIR",
        help="continue the run in DIR (training or fine-tuning) from its last checkpoint, "
        "with its own config.json; takes no other option but --parallel, "
        "--activation-checkpointing and --compile (how it runs, not what it learns)",
    )  # fmt: skip
    add_config_flags(train_parser, {})
    train_parser.set_defaults(func=run_train, preset={})

    finetune_parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on new data (new head, optionally a higher resolution)",
        description="Fine-tune any checkpoint load_pretrained reads, with the paper's recipe: "
        "a new zero-initialised head, SGD with momentum 0.9, gradient clipping at global norm "
        "1, cosine decay after a warm-up. --img-size above the checkpoint's resizes the "
        "position embeddings. --recipe bit uses BiT-HyperRule instead. Resume with `vitkit "
        "train --resume DIR`.",
    )
    finetune_parser.add_argument(
        "--from", dest="init_from", required=True, metavar="CKPT",
        help="the checkpoint to start from (vitkit, official .npz, ...)",
    )  # fmt: skip
    finetune_parser.add_argument(
        "--recipe", choices=("bit",),
        help="'bit': BiT-HyperRule (SGD, lr 0.003 x batch / 512, staircase schedule, length, "
        "mixup and crop by the training set's size and image area, computed and logged when "
        "the run starts); the config file and flags override any of it",
    )  # fmt: skip
    add_config_flags(finetune_parser, FINETUNE_DEFAULTS)
    finetune_parser.set_defaults(func=run_train, preset=FINETUNE_DEFAULTS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults of the subcommand, then the TOML file, then the flags."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    augment_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    given = vars(args)
    flags = {k: v for k, v in given.items() if k in train_fields}
    flags["augment"] = {k: v for k, v in given.items() if k in augment_fields}
    bit = getattr(args, "recipe", None) == "bit"
    values = merge(args.preset, BIT_FIXED) if bit else dict(args.preset)
    recipe = read_toml(args.config) if args.config is not None else None
    cfg = TrainConfig.from_dict(merge(merge(values, recipe or {}), flags))
    if recipe is not None and "data" not in recipe and "data" not in flags:
        # The default data (the shipped digits) is for the bare `vitkit train`: a recipe is
        # written for a dataset, and training it on another one would go unnoticed.
        raise ValueError(f"the recipe {args.config} names no data: pass --data")
    if bit:  # the data-dependent part, unless the file or a flag set it
        explicit = merge(recipe or {}, flags)
        cfg = bit_config(cfg, keep={*explicit, *explicit["augment"]} - {"augment"})
    return cfg


def run_train(args: argparse.Namespace) -> int:
    resume = getattr(args, "resume", None)
    resume_options = {k: getattr(args, k) for k in RESUME_OPTIONS if hasattr(args, k)}
    if resume is not None:
        given = {k for k, v in vars(args).items() if v is not None}
        others = sorted(given - {"resume", "func", "preset", "command", *RESUME_OPTIONS})
        if others:
            raise ValueError(
                "--resume continues a run with the settings of its config.json; drop the "
                f"other options ({', '.join(others)}); only how it runs may change: "
                + ", ".join("--" + k.replace("_", "-") for k in RESUME_OPTIONS)
            )
    cfg = None if resume is not None else config_from_args(args)
    try:
        with progress_bar() as progress:
            summary = train(cfg, resume=resume, progress=progress,
                            resume_options=resume_options if resume is not None else None)  # fmt: skip
    except (TrainingDiverged, TrainingInterrupted) as err:
        if is_main_rank():
            print(f"vitkit {args.command}: {err}", file=sys.stderr)
        return 1
    if is_main_rank():
        print(one_line_summary(summary))
    return 0


def one_line_summary(summary: dict[str, Any]) -> str:
    """What a person wants at the end of a run, formatted for people."""
    metrics = ", ".join(
        f"test {key.removeprefix('test_')} "
        + (f"{value:.2%}" if key == "test_accuracy" else f"{value:.4g}")
        for key, value in summary.items()
        if key.startswith("test_") and isinstance(value, float)
    )
    minutes, seconds = divmod(round(summary["wall_seconds"]), 60)
    took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    return (
        f"{metrics} in {took} ({summary['images_per_second']:,.0f} train images/s); "
        f"run folder {summary['run_folder']}"
    )


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A tqdm bar fed by the loop's progress callback (main process only); the library's log
    lines are written above it instead of through it."""
    bar: tqdm | None = None

    def update(step: int, total: int, record: dict[str, Any] | None) -> None:
        nonlocal bar
        if not is_main_rank():
            return
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, unit="step", dynamic_ncols=True)
        bar.total = total  # a time budget refits the run's length as it goes
        bar.update(step - bar.n)
        if record is not None:
            shown: dict[str, Any] = {k: record[k] for k in ("loss", "accuracy") if k in record}
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in shown.items()},
                             "img/s": f"{record['images_per_second']:.0f}"})  # fmt: skip

    with logging_redirect_tqdm():
        try:
            yield update
        finally:
            if bar is not None:
                bar.close()
