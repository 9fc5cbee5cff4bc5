"""``vitkit models``: every registered model, of every architecture, with its size and cost."""

from __future__ import annotations

import argparse

import torch

from vitkit.models import architecture_of, flops_per_image, list_models, model_config

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                c.rjust(w) if i > 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return 0
