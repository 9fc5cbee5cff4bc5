"""The ``vitkit`` command: one subcommand per module listed in ``COMMAND_MODULES``.

Each module defines ``register(subparsers)``, which adds its parser and sets ``func`` (taking
the parsed ``argparse.Namespace`` and returning an exit code) as the parser's default. The
plugins (entry point group ``vitkit.plugins``) are imported first, so that what they register
is there for every subcommand (a broken one costs a warning line, not the command).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from importlib.metadata import version

from vitkit.deploy import MissingDependency
from vitkit.utils.allocator import keep_freed_memory
from vitkit.utils.plugins import load_plugins
from vitkit.utils.remote import SHOW_PROGRESS

COMMAND_MODULES: tuple[str, ...] = (
    "models",
    "analyze",
    "convert",
    "inspect",
    "train",
    "pretrain",
    "evaluate",
    "predict",
    "export",
    "push",
    "fewshot",
    "probe",
    "experiment",
    "data",
)


def build_parser() -> argparse.ArgumentParser:
    load_plugins()
    parser = argparse.ArgumentParser(
        prog="vitkit",
        description="The Vision Transformer (Dosovitskiy et al., ICLR 2021): models, "
        "checkpoints, training and analysis.",
    )
    parser.add_argument("--version", action="version", version=f"vitkit {version('vitkit')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"vitkit.cli.{name}").register(subparsers)
    return parser


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system fault: the path and the system's reason, without
    Python's ``[Errno N]``; vitkit's own messages (no errno) as they are."""
    if err.errno is None or not err.strerror:
        return str(err)
    where = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
    return f"{where}: {err.strerror}" if where else err.strerror


def _silence_stdout() -> None:
    """After a closed pipe (``vitkit inspect ... | head``), point stdout at /dev/null so that
    Python's flush at exit does not fail again (the recipe of Python's ``signal`` docs)."""
    # (stdout may have been replaced by something without a file descriptor)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a failure is one line on stderr: exit code 2 for bad input (a wrong
    value, a missing file), 1 for the system refusing (read-only folder, full disk)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # The library reports through logging; the command line shows its info lines plainly,
    # once: under torchrun the other ranks would repeat every line, so they show errors only.
    logging.basicConfig(
        level=logging.INFO if is_main_rank() else logging.ERROR, format="%(message)s"
    )
    progress = SHOW_PROGRESS.set(is_main_rank())  # a download of weights draws its progress
    if getattr(args, "keep_freed_memory", False):  # the commands that run a checkpoint
        keep_freed_memory()  # (training follows its config's run.keep_freed_memory)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here rather than at exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except (ValueError, FileNotFoundError, MissingDependency) as err:
        message = describe_os_error(err) if isinstance(err, OSError) else str(err)
        report(f"vitkit {args.command}: error: {message}")
        return 2
    except OSError as err:
        report(f"vitkit {args.command}: error: {describe_os_error(err)}")
        return 1
    finally:
        SHOW_PROGRESS.reset(progress)  # main() called from Python leaves the library quiet


def is_main_rank() -> bool:
    """Whether this process is torchrun's rank 0 (or not under torchrun): the one that
    reports, so a message is printed once, not once a rank."""
    return int(os.environ.get("RANK", "0")) == 0


def report(message: str) -> None:
    """Print an error once: under torchrun every rank meets the same bad input."""
    if is_main_rank():
        print(message, file=sys.stderr)
