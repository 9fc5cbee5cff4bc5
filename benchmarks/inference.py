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

transformers is an optional benchmark dependency (``pip install transformers``), never a
runtime one.

Usage: python benchmarks/inference.py [--models vit_ti16 vit_s16 vit_b16] [--batches 1 8 32]
       [--precisions fp32 bf16] [--repeats 5] [--attn auto sdpa eager] [--threads 2] [--quick]
       [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from vitkit.models import create_model, model_config

PRECISIONS = ("fp32", "bf16", "bf16w")


def hf_model(name: str, attn: str) -> nn.Module:
    import transformers

    cfg = model_config(name)
    hf_cfg = transformers.ViTConfig(
        image_size=cfg.img_size[0],
        patch_size=cfg.patch_size[0],
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act="gelu",
        layer_norm_eps=cfg.eps,
        qkv_bias=cfg.qkv_bias,
        num_labels=cfg.num_classes,
        attn_implementation=attn,
    )
    return transformers.ViTForImageClassification(hf_cfg)


def timed_calls(
    candidates: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None],
    clock: Callable[[], float],
) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates called in turn."""
    for _ in range(warmup):
        for call in candidates.values():
            call()
    sync()
    times: dict[str, list[float]] = {key: [] for key in candidates}
    for _ in range(repeats):
        for key, call in candidates.items():
            start = clock()
            call()
            sync()
            times[key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def measure(
    name: str, batch: int, precision: str, attn: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Images/s of vitkit (one entry per attention path) and of HF (one per attention path)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision == "bf16w" else torch.float32
    models: dict[str, nn.Module] = {
        f"vitkit[{impl}]": create_model(name, gelu="none", attn_impl=impl) for impl in attn
    }
    for impl in ("sdpa", "eager") if precision != "fp32" else ("sdpa",):
        models[f"hf[{impl}]"] = hf_model(name, impl)
    for key in models:
        models[key] = models[key].eval().to(device, dtype)
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

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
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
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    extra = [f"vitkit[{impl}]" for impl in args.attn[1:]]
    header = ["model", "batch", "precision", "vitkit img/s", "HF img/s", "HF attn", "ratio", *extra]
    rows = []
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
                row += [f"{ours / theirs:.2f}x", *(f"{rates[key]:.1f}" for key in extra)]
                rows.append(row)
                print("  " + " ".join(row), file=sys.stderr, flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
