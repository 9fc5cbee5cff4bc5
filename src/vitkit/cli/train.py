"""``vitkit train`` and ``finetune``.

The options of ``train`` and ``finetune`` are generated from ``TrainConfig``'s sections (and
the registered tasks' and evaluators' options), so every setting is a flag, a TOML key and a
line of ``--help``; ``resolve_config`` turns presets, config files and flags into the run's
config.
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
from vitkit.training import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from vitkit.training.config import (
    EVALUATOR_OPTIONS,
    SECTIONS,
    TASK_OPTIONS,
    flat_keys,
    read_preset,
    resolve_config,
    settings,
)
from vitkit.training.loop import RESUME_OPTIONS, Progress
from vitkit.training.tasks import registered_tasks
from vitkit.utils.config import merge_tables

PAIR_METAVARS = {
    "betas": ("BETA1", "BETA2"),
    "crop_scale": ("MIN", "MAX"),
    "crop_ratio": ("MIN", "MAX"),
    "randaugment": ("NUM_OPS", "MAGNITUDE"),
    "resize_ramp": ("FROM", "UNTIL"),
}
SECTION_TITLES = {
    "task": "task options ([task] and [task.<name>] in a config file)",
    "model": "model options ([model])",
    "data": "data options ([data])",
    "optim": "optimizer options ([optim])",
    "schedule": "schedule options ([schedule])",
    "augment": "augmentation options ([augment])",
    "evaluators": "evaluation options ([evaluators] and [evaluators.<name>])",
    "run": "run options ([run])",
}


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _add_field(
    group: argparse._ArgumentGroup, flag: str, dest: str, hint: Any, help: str, default: Any
) -> None:
    """One flag for one config field, typed from its annotation."""
    flag = "--" + flag
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS)
    if "default" not in help:
        help = f"{help} (default: {default})"
    if base is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help, **kwargs)
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        group.add_argument(flag, nargs="*", type=item, help=help, **kwargs)
    elif typing.get_origin(base) in (tuple, typing.Literal):
        # A pair of values cannot also be the single word 'none', and among a setting's
        # choices 'none' may mean something else (--test-tta none: no augmentation), so these
        # are unset by a flag of their own.
        unset = "--no-" + flag.removeprefix("--")
        suffix = f" ({unset} to unset)" if optional else ""
        if typing.get_origin(base) is tuple:
            item = typing.get_args(base)[0]
            metavar = PAIR_METAVARS.get(dest.rsplit(".", 1)[-1])
            group.add_argument(
                flag, nargs=2, type=item, metavar=metavar, help=help + suffix, **kwargs
            )
        else:
            group.add_argument(flag, choices=typing.get_args(base), help=help + suffix, **kwargs)
        if optional:
            group.add_argument(
                unset, action="store_const", const=None, help=argparse.SUPPRESS, **kwargs
            )
    else:
        kind = _parse_optional(base) if optional else base
        suffix = " ('none' to unset)" if optional else ""
        group.add_argument(flag, type=kind, help=help + suffix, **kwargs)


def _lookup(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        values = values.get(part, {}) if isinstance(values, dict) else {}
    return values


def add_config_flags(
    parser: argparse.ArgumentParser,
    presets: tuple[str, ...] = (),
    hidden: frozenset[str] = frozenset(),
) -> None:
    """A flag for each setting but ``init_from`` and the flags in ``hidden`` (which the
    command sets another way); the defaults shown are those after ``presets``."""
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        metavar="FILE",
        help="TOML file of settings, in sections ([optim], [schedule], ...; see "
        "docs/configuration.md or any run's config.json); may be given more than once, later "
        "files win; flags override them",
    )
    defaults = TrainConfig().to_dict()
    for name in presets:
        defaults = merge_tables(TrainConfig, defaults, read_preset(name))
    groups = {section: parser.add_argument_group(SECTION_TITLES[section]) for section in SECTIONS}
    for path, field, flag in settings():
        if flag in hidden or flag == "from":
            continue
        hint = typing.get_type_hints(_owner(path))[field.name]
        default = _lookup(defaults, path)
        if default == {}:  # a plugin's options not in the default config: its own default
            default = _field_default(field)
        _add_field(groups[path[0]], flag, ".".join(path), hint, field.metadata["help"], default)


def _owner(path: tuple[str, ...]) -> type:
    """The dataclass that holds the setting at ``path``."""
    if len(path) == 3:
        return (TASK_OPTIONS if path[0] == "task" else EVALUATOR_OPTIONS)[path[1]]
    return typing.get_type_hints(TrainConfig)[path[0]]


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


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
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR (training or fine-tuning) from its last checkpoint, "
        "with its own config.json; takes no other option but "
        + ", ".join("--" + k.replace("_", "-") for k in RESUME_OPTIONS)
        + " (how it runs, not what it learns)",
    )
    add_config_flags(train_parser)
    train_parser.set_defaults(func=run_train, presets=())

    finetune_parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on new data (new head, optionally a higher resolution)",
        description="Fine-tune any checkpoint load_pretrained reads, with the paper's recipe "
        "(the preset 'finetune'): a new zero-initialised head, SGD with momentum 0.9, gradient "
        "clipping at global norm 1, cosine decay after a warm-up. --img-size above the "
        "checkpoint's resizes the position embeddings. --recipe bit uses BiT-HyperRule "
        "instead. Resume with `vitkit train --resume DIR`.",
    )
    finetune_parser.add_argument(
        "--from",
        dest="model.init_from",
        required=True,
        metavar="CKPT",
        help="the checkpoint to start from (vitkit, official .npz, ...)",
    )
    finetune_parser.add_argument(
        "--recipe",
        choices=("bit",),
        help="'bit': BiT-HyperRule (the preset 'bit': SGD, lr 0.003 x batch / 512, staircase "
        "schedule, length, mixup and crop by the training set's size and image area, "
        "computed and logged when the run starts); the config files and flags override any "
        "of it",
    )
    add_config_flags(finetune_parser, ("finetune",))
    finetune_parser.set_defaults(func=run_train, presets=("finetune",))


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, nested (their ``dest`` is the setting's dotted path)."""
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.split(".")[0] not in SECTIONS or "." not in dest:
            continue
        *parents, last = dest.split(".")
        table = values
        for part in parents:
            table = table.setdefault(part, {})
        table[last] = value
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The command's presets, then the config files, then the flags."""
    presets = [*args.presets, *(["bit"] if getattr(args, "recipe", None) == "bit" else [])]
    return resolve_config(presets, args.config or [], flag_values(args))


def run_train(args: argparse.Namespace) -> int:
    resume = getattr(args, "resume", None)
    given = flag_values(args)
    resume_options = {k: v for k, v in given.get("run", {}).items() if k in RESUME_OPTIONS}
    if resume is not None:
        flat = {path: key for key, path in flat_keys().items()}
        names = {".".join(path): flat.get(path, path[-1]) for path, _, _ in settings()}
        named = [names[dest] for dest in vars(args) if dest in names]
        others = sorted({*named, *(["config"] if args.config else [])} - set(RESUME_OPTIONS))
        if others:
            raise ValueError(
                "--resume continues a run with the settings of its config.json; drop the "
                f"other options ({', '.join(others)}); only how it runs may change: "
                + ", ".join("--" + k.replace("_", "-") for k in RESUME_OPTIONS)
            )
    cfg = None if resume is not None else config_from_args(args)
    try:
        with progress_bar() as progress:
            summary = train(
                cfg,
                resume=resume,
                progress=progress,
                resume_options=resume_options if resume is not None else None,
            )
    except (TrainingDiverged, TrainingInterrupted) as err:
        if is_main_rank():
            print(f"vitkit {args.command}: {err}", file=sys.stderr)
        return 1
    if is_main_rank():
        print(one_line_summary(summary))
    return 0


def one_line_summary(summary: dict[str, Any]) -> str:
    """What a person wants at the end of a run, formatted for people."""
    scores = [(k, v) for k, v in summary.items() if k.startswith("test_") and isinstance(v, float)]
    task = registered_tasks().get(summary.get("task", "classification"))
    names = task.metric_names if task is not None else {}
    metrics = ", ".join(
        f"test {names.get(key.removeprefix('test_'), key.removeprefix('test_'))} "
        + (f"{value:.2%}" if key == "test_accuracy" else f"{value:.4g}")
        # accuracy first, whatever order the task's metrics come in; the rest as given
        for key, value in sorted(scores, key=lambda item: item[0] != "test_accuracy")
    )
    if "test_images" in summary:  # absent from summaries of earlier versions
        metrics += f" on {summary['test_images']:,} test images"
    if summary.get("tta", "none") != "none":
        metrics += f" ({summary['tta']} test-time augmentation)"
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
            bar.set_postfix(
                {
                    **{k: f"{v:.3f}" for k, v in shown.items()},
                    "img/s": f"{record['images_per_second']:.0f}",
                }
            )

    with logging_redirect_tqdm():
        try:
            yield update
        finally:
            if bar is not None:
                bar.close()
