"""``vitkit models``: every registered model with its size and cost."""

from __future__ import annotations

import argparse

import torch

from vitkit.models import VisionTransformer, flops_per_image, list_models, model_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the registered models",
        description="List every registered model with its parameter count and forward GFLOPs "
        "(2 FLOPs per multiply-add) per image at its default resolution.",
    )
    p.add_argument("--filter", default="", help="only names containing this text, e.g. 'b16'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models():
        if args.filter not in name:
            continue
        cfg = model_config(name)
        with torch.device("meta"):  # no memory, no initialisation: ViT-H costs nothing here
            n_params = VisionTransformer(cfg).num_parameters()
        size = f"{cfg.img_size[0]}x{cfg.img_size[1]}"
        gflops = flops_per_image(cfg) / 1e9
        rows.append(
            (name, f"{n_params:,}", f"{gflops:.2f}" if gflops >= 0.1 else f"{gflops:.4f}", size)
        )
    header = ("model", "parameters", "GFLOPs", "input")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return 0
