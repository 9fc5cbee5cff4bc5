"""Inference speed: images/s of vitkit beside Hugging Face transformers' ViTForImageClassification.

Both models get the same configuration (224 px, 16x16 patches, width/depth/heads/MLP of the
named size, exact-erf GELU on both sides: vitkit ``gelu="none"``, HF ``hidden_act="gelu"``,
LayerNorm eps 1e-6, 1000 classes, [class]-token head) and random weights. Every call runs under
``torch.inference_mode()``; ``bf16`` is ``torch.autocast`` entered around each call (what a user
writes), ``bf16w`` converts both models and the input to bfloat16 instead. The libraries are
timed interleaved in one process, call by call, so a busy machine slows them alike; the table
shows the median of ``--repeats`` timed calls after ``--warmup`` untimed ones. HF is measured
with its default SDPA attention and, under bf16, also with its eager attention: the faster of
the two is the baseline of the ratio. ``--attn sdpa eager`` adds columns timing vitkit with
each attention path forced (the default ``auto`` picks per device and dtype). On a machine
others are using, wall-clock times of two threads swing by 10x (a thread waits for a preempted
partner); ``--threads 1 --clock cpu`` counts the CPU time of the one computing thread instead,
which contention barely moves.

``--compile`` adds both models compiled with frozen weights (``vitkit.deploy.CompiledClassifier``,
what ``vitkit eval --compile`` runs; Hugging Face's through the same wrapper), compiled during
the warm-up calls, and the ratio of vitkit compiled to Hugging Face's faster eager path (what
users of either run by default).

``--onnx`` and ``--int8`` add columns to the fp32 rows: the vitkit model exported to ONNX
(``vitkit export --to onnx``) run by onnxruntime's CPU provider with ``--threads`` threads, and
vitkit with int8 linear layers (``--to int8``: torchao dynamic quantisation). Both need
``pip install 'vitkit[onnx]'``.

transformers is an optional benchmark dependency (``pip install transformers``), never a
runtime one.

Usage: python benchmarks/inference.py [--models vit_ti16 vit_s16 vit_b16] [--batches 1 8 32]
       [--precisions fp32 bf16] [--repeats 5] [--attn auto sdpa eager] [--threads 2] [--quick]
       [--clock wall|cpu] [--compile] [--onnx] [--int8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from _common import cpu_name, device_sync, hf_model, markdown_table, timed_calls
from torch import nn

from vitkit.deploy import CompiledClassifier, OnnxClassifier, export_onnx, quantize_int8
from vitkit.models import create_model, model_config

PRECISIONS = ("fp32", "bf16", "bf16w")


@cache
def onnx_file(name: str, attn: str, folder: str) -> Path:
    """``name`` exported to ONNX once per run (random weights: speed does not depend on them)."""
    model = create_model(name, gelu="none", attn_impl=attn)
    return export_onnx(model, Path(folder) / f"{name}-{attn}.onnx")


def measure(
    name: str, batch: int, precision: str, attn: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Images/s of vitkit (one entry per attention path), of HF (one per attention path), of
    both compiled with --compile and, in fp32 with --onnx / --int8, of vitkit's ONNX export
    under onnxruntime and its int8 copy."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision == "bf16w" else torch.float32
    models: dict[str, nn.Module] = {
        f"vitkit[{impl}]": create_model(name, gelu="none", attn_impl=impl) for impl in attn
    }
    for impl in ("sdpa", "eager") if precision != "fp32" else ("sdpa",):
        models[f"hf[{impl}]"] = hf_model(model_config(name), impl)
    for key in models:
        models[key] = models[key].eval().to(device, dtype)
    if args.compile:  # compiled at their first (warm-up) call; HF's through the same wrapper
        models["compiled[vitkit]"] = CompiledClassifier(models[f"vitkit[{attn[0]}]"])
        models["compiled[hf]"] = CompiledClassifier(models["hf[sdpa]"])
    if precision == "fp32" and args.int8:
        models["int8"] = quantize_int8(models[f"vitkit[{attn[0]}]"])
    if precision == "fp32" and args.onnx and device.type == "cpu":
        models["onnxruntime"] = OnnxClassifier(onnx_file(name, attn[0], args.tmp), args.threads)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)

    def call(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            autocast = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext()
            )
            with autocast:
                return model(x)

        return run

    sync = device_sync(device)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    calls = {key: call(model) for key, model in models.items()}
    with torch.inference_mode():
        seconds = timed_calls(calls, args.warmup, args.repeats, sync, clock)
    return {key: batch / s for key, s in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_ti16", "vit_s16", "vit_b16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    parser.add_argument(
        "--attn",
        nargs="+",
        choices=("auto", "sdpa", "eager"),
        default=["auto"],
        help="vitkit attention paths to time; the first one is the ratio's numerator",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (both libs)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU time of the calling thread, for busy machines (needs --threads 1)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add both models compiled with frozen weights (tens of seconds each to compile)",
    )
    parser.add_argument(
        "--onnx", action="store_true", help="fp32 rows: add vitkit's ONNX export in onnxruntime"
    )
    parser.add_argument(
        "--int8", action="store_true", help="fp32 rows: add vitkit with int8 linear layers"
    )
    parser.add_argument("--quick", action="store_true", help="vit_ti16, batches 1 and 8, 3 runs")
    args = parser.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or torch.cuda.is_available()):
        parser.error("--clock cpu times the calling thread only: use it with --threads 1 on CPU")
    try:
        import transformers
    except ImportError:
        print("this benchmark compares with Hugging Face transformers: pip install transformers")
        return 2
    if args.quick:
        args.models, args.batches, args.repeats = ["vit_ti16"], [1, 8], 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {args.threads} threads"
    )
    print(f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"CPU: {cpu_name()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    extra = [f"vitkit[{impl}]" for impl in args.attn[1:]]
    extra += ["onnxruntime"] * args.onnx + ["int8"] * args.int8
    compiled = ["compiled[vitkit]", "compiled ratio", "compiled[hf]"] if args.compile else []
    header = ["model", "batch", "precision", "vitkit img/s", "HF img/s", "HF attn", "ratio"]
    header += compiled + extra
    rows = []
    args.tmp = tempfile.mkdtemp(prefix="vitkit-bench-")
    for name in args.models:
        for batch in args.batches:
            for precision in args.precisions:
                rates = measure(name, batch, precision, args.attn, args)
                ours = rates[f"vitkit[{args.attn[0]}]"]
                hf_attn, theirs = max(
                    ((k[3:-1], v) for k, v in rates.items() if k.startswith("hf")),
                    key=lambda kv: kv[1],
                )
                row = [name, str(batch), precision, f"{ours:.1f}", f"{theirs:.1f}", hf_attn]
                row += [f"{ours / theirs:.2f}x"]
                if args.compile:
                    ours_compiled = rates["compiled[vitkit]"]
                    row += [f"{ours_compiled:.1f}", f"{ours_compiled / theirs:.2f}x"]
                    row += [f"{rates['compiled[hf]']:.1f}"]
                row += [f"{rates[key]:.1f}" if key in rates else "-" for key in extra]
                rows.append(row)
                print("  " + " ".join(row), file=sys.stderr, flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
