"""The ``vitkit`` command: one subcommand per module listed in ``COMMAND_MODULES``.

Each module defines ``register(subparsers)``, which adds its parser and sets ``func`` (taking
the parsed ``argparse.Namespace`` and returning an exit code) as the parser's default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: tuple[str, ...] = (
    "models",
    "analyze",
    "convert",
    "inspect",
    "train",
    "fewshot",
    "probe",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitkit",
        description="The Vision Transformer (Dosovitskiy et al., ICLR 2021): models, "
        "checkpoints, training and analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"vitkit.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitkit {args.command}: error: {err}", file=sys.stderr)
        return 2
