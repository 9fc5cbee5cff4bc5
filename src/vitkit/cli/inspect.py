"""``vitkit inspect``: what a checkpoint holds, without running it."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from vitkit.analysis.inputs import locate_checkpoint
from vitkit.checkpoints import CheckpointError, read_checkpoint
from vitkit.checkpoints.core import check_named_model, check_state_dict
from vitkit.models import architecture_of

SHOWN_DROPPED = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's format, architecture, parameter count and numerics",
        description="Recognise CKPT's format and show its architecture, parameter count, "
        "numerics (GELU form, LayerNorm epsilon), whether its weights fit that architecture, "
        "and the stored entries that loading would drop (optimizer state, ...).",
    )
    p.add_argument(
        "checkpoint", help="checkpoint file or folder, or a run folder (its best checkpoint)"
    )
    p.add_argument(
        "--model", help="registered model name giving what CKPT does not record, e.g. vit_b16"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = locate_checkpoint(args.checkpoint)[0]
    ckpt = read_checkpoint(path, args.model)
    if args.model:
        check_named_model(path, args.model, ckpt.config)
    cfg = ckpt.config
    architecture = architecture_of(cfg)
    description = architecture.describe(cfg)
    with torch.device("meta"):
        model = architecture.build(cfg)
    try:
        check_state_dict(model, ckpt.state_dict)
        fits = "yes"
    except CheckpointError as err:
        fits = f"no: {err}"
    info: dict[str, Any] = {
        "format": ckpt.format,
        "architecture": description.summary,
        "parameters": sum(t.numel() for t in ckpt.state_dict.values()),
        "numerics": description.numerics,
        "weights fit": fits,
        "dropped": ckpt.dropped,
    }
    if args.json:
        print(json.dumps({**info, "config": cfg.to_dict()}, indent=2))
    else:
        for key, value in info.items():
            if key == "parameters":
                value = f"{value:,}"
            elif key == "dropped":
                shown = ", ".join(value[:SHOWN_DROPPED]) + (
                    ", ..." if len(value) > SHOWN_DROPPED else ""
                )
                value = f"{len(value)} entries: {shown}" if value else "nothing"
            print(f"{key + ':':13} {value}")
    return 0 if fits == "yes" else 1
