"""MkDocs hook: the CLI reference page is generated from the argument parsers at build time.

A page holding the marker ``<!-- cli-reference -->`` gets, in its place, a section per
``vitkit`` subcommand (and per sub-subcommand, such as ``vitkit data pack``) with the
command's own ``--help`` text, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

MARKER = "<!-- cli-reference -->"
# argparse wraps help to $COLUMNS: fixed, so the page does not depend on a terminal.
HELP_WIDTH = "100"


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand parser below `parser`, depth first, with its full program name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                yield sub.prog, sub
                yield from _subcommands(sub)


def cli_reference() -> str:
    """Markdown: the top-level help, then a section per subcommand with its help."""
    os.environ["COLUMNS"] = HELP_WIDTH
    from vitkit.cli import build_parser

    parser = build_parser()
    parts = [f"```text\n{parser.format_help().rstrip()}\n```\n"]
    for prog, sub in _subcommands(parser):
        parts.append(f"## `{prog}`\n\n```text\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
