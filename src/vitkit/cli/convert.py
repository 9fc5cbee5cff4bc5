"""``vitkit convert``: any checkpoint vitkit reads, written in another format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitkit.checkpoints import EXPORT_FORMATS, build_model, export, read_checkpoint
from vitkit.checkpoints.core import Checkpoint, check_named_model
from vitkit.utils.runlayout import locate_checkpoint

SHOWN_DROPPED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to vitkit, timm, official .npz or Hugging Face format",
        description="Read SRC in any format vitkit knows (recognised by itself) and write it "
        "to DST (a model of any registered architecture to vitkit's format, ViTs to all). DST "
        "is a folder for --to hf (config.json with id2label, model.safetensors, "
        "preprocessor_config.json for transformers.pipeline, and a model card README.md) and "
        "for --to vitkit (unless it ends in .safetensors); for --to timm a "
        ".safetensors/.pth/.pt/.bin state-dict file, or any other name: timm's hub folder "
        "(config.json with architecture and pretrained_cfg, model.safetensors, README.md) for "
        "timm.create_model('local-dir:DST', pretrained=True); an .npz file for --to official. "
        "When SRC is a run folder or a checkpoint in one, the model card carries the run's "
        "test accuracy and training config. DST is written under a temporary name and renamed when complete. "
        "Only the model is converted: what SRC holds besides (a training checkpoint's "
        "optimizer and scheduler state, ...) is listed on stderr, and SRC itself is never "
        "replaced by a copy without it.",
    )
    p.add_argument("src", help="checkpoint file or folder to read")
    p.add_argument("dst", help="where to write")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="format to write")
    p.add_argument(
        "--model",
        help="registered model name giving what SRC does not record (a timm state dict's "
        "number of heads), e.g. vit_b16",
    )
    p.add_argument("--img-size", type=int, help="resize the position embeddings to this size")
    p.add_argument("--num-classes", type=int, help="replace the head by a zero-initialised one")
    p.add_argument("--gelu", choices=("tanh", "none"), help="override the GELU (none = exact)")
    p.add_argument("--eps", type=float, help="override the LayerNorm epsilon")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def describe_dropped(ckpt: Checkpoint) -> str:
    shown = ", ".join(ckpt.dropped[:SHOWN_DROPPED])
    more = len(ckpt.dropped) - SHOWN_DROPPED
    return f"{len(ckpt.dropped)} entries that are not model weights ({shown}" + (
        f" and {more} more)" if more > 0 else ")"
    )


def run(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst} exists; pass --overwrite to replace it")
    overrides = {
        name: getattr(args, name)
        for name in ("img_size", "num_classes", "gelu", "eps")
        if getattr(args, name) is not None
    }
    ckpt = read_checkpoint(args.src, args.model)
    if args.model:
        check_named_model(Path(args.src), args.model, ckpt.config)
    if ckpt.dropped and dst.exists() and dst.resolve() == Path(args.src).resolve():
        raise ValueError(
            f"{args.src} holds {describe_dropped(ckpt)}, e.g. the optimizer and scheduler state "
            "that `vitkit train --resume` needs; converting it onto itself would delete them: "
            "write to another path"
        )
    model = build_model(ckpt, **overrides)
    run_folder = locate_checkpoint(args.src)[1] if Path(args.src).exists() else None
    export(model, dst, args.to, run=run_folder)
    print(f"{args.src} ({ckpt.format}) -> {dst} ({args.to}): {model.num_parameters():,} parameters")
    if ckpt.dropped:
        print(
            f"note: {args.src} also holds {describe_dropped(ckpt)}; {dst} has the model only",
            file=sys.stderr,
        )
    return 0
