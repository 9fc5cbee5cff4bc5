"""``vitkit models``: every registered model, of every architecture, with its size and cost."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from vitkit.models import architecture_of, flops_per_image, list_models, model_config
from vitkit.utils.remote import PRETRAINED

VIEWED_COLUMNS = ("width", "depth", "patch")  # from each architecture's ``Description``


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the registered models",
        description="List every registered model with its architecture, parameter count, "
        "forward GFLOPs (2 FLOPs per multiply-add) per image at its default resolution, and "
        "for ViTs width, depth and patch size ('-' where a column does not apply).",
    )
    p.add_argument("--filter", default="", help="only names containing this text, e.g. 'b16'")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="list the names of the paper's released weights instead, which every command "
        "takes as a checkpoint (downloaded once into $VITKIT_CACHE), and their URLs",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return list_pretrained(args.filter)
    rows = []
    for name in list_models():
        if args.filter not in name:
            continue
        cfg = model_config(name)
        architecture = architecture_of(cfg)
        with torch.device("meta"):  # no memory, no initialisation: ViT-H costs nothing here
            n_params = architecture.build(cfg).num_parameters()
        gflops = flops_per_image(cfg) / 1e9
        columns = architecture.describe(cfg).columns
        rows.append(
            (
                name,
                architecture.name,
                f"{n_params:,}",
                f"{gflops:.2f}" if gflops >= 0.1 else f"{gflops:.4f}",
                f"{cfg.img_size[0]}x{cfg.img_size[1]}",
                *(columns.get(c, "-") for c in VIEWED_COLUMNS),
            )
        )
    header = ("model", "architecture", "parameters", "GFLOPs", "input", *VIEWED_COLUMNS)
    print_table(header, rows, left_columns=2)
    return 0


def list_pretrained(text: str) -> int:
    """The names of ``PRETRAINED`` (those containing ``text``) with what they hold and their
    URL; a bare name is listed once, as the alias it is."""
    rows = []
    for name, weights in PRETRAINED.items():
        if text not in name:
            continue
        aliases = [n for n, w in PRETRAINED.items() if w is weights and n != name]
        if aliases and "/" not in name:
            continue  # a bare alias: shown beside its full name
        rows.append((name, " ".join(aliases) or "-", weights.description, weights.url))
    print_table(("name", "also", "weights", "url"), rows, left_columns=4)
    return 0


def print_table(
    header: tuple[str, ...], rows: Sequence[tuple[str, ...]], left_columns: int
) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                c.rjust(w) if i >= left_columns else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
