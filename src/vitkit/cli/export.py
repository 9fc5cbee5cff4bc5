"""``vitkit export``: a checkpoint as an ONNX file, a ``torch.export`` program or int8 weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitkit.checkpoints import load_pretrained
from vitkit.deploy import DEPLOY_FORMATS, OnnxClassifier, export_model, load_pt2, max_difference

CHECK_BATCHES = (1, 3)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint for deployment: ONNX, torch.export .pt2 or int8",
        description="Read CKPT (any checkpoint load_pretrained reads) and write OUT for "
        "deployment. --to onnx: an .onnx file with a dynamic batch dimension and the config "
        "(input size, class names) in its metadata, for onnxruntime and other ONNX runtimes; "
        "`vitkit eval` and `predict` run it. --to pt2: a torch.export program (.pt2) for "
        "PyTorch runtimes. --to int8: a .safetensors file whose linear layers compute in int8 "
        "(torchao dynamic quantisation); `vitkit eval` and `predict` run it. ONNX and .pt2 "
        "files are checked against the PyTorch model on random inputs after writing. Needs "
        "pip install 'vitkit[onnx]' (onnx, onnxscript, onnxruntime, torchao).",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="any checkpoint load_pretrained reads")
    p.add_argument(
        "out", metavar="OUT", type=Path, help="the file to write (.onnx, .pt2 or .safetensors)"
    )
    p.add_argument("--to", required=True, choices=DEPLOY_FORMATS, help="format to write")
    p.add_argument(
        "--model", help="registered model name, for checkpoint formats without an architecture"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    model = load_pretrained(args.checkpoint, args.model)
    export_model(model, args.out, args.to)
    line = f"{args.checkpoint} -> {args.out} ({args.to})"
    if args.to in ("onnx", "pt2"):
        exported = OnnxClassifier(args.out) if args.to == "onnx" else load_pt2(args.out)[0]
        diff = max_difference(model, exported, CHECK_BATCHES)
        line += f"; max |logit difference| from PyTorch on random batches of 1 and 3: {diff:.2e}"
    print(line)
    return 0
