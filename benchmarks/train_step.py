"""Training speed: images/s of a forward, backward and AdamW step, vitkit beside Hugging Face.

Models (issue 13): ``vit_cifar`` (32 px, batch 128), ``vit_cifar_hybrid`` (no Hugging Face
twin), ``vit_ti16`` and ``vit_s16`` (224 px, batch 32), each in fp32 and under bf16 autocast
(fp32 weights and optimizer state, as ``vitkit train --precision bf16``). Both libraries get the
same configuration and random weights (see ``_common.hf_model``) and the same step: cross-entropy
on random labels, ``loss.backward()``, ``torch.optim.AdamW`` (PyTorch's default implementation
for the device). Steps are timed interleaved in one process, one step of each candidate in turn,
so a busy machine slows them alike; the table shows the median of ``--rounds`` timed steps after
``--warmup`` untimed ones. Hugging Face runs with each of ``--hf-attn`` and the faster is the
ratio's baseline; ``--attn`` lists vitkit's attention paths (the first is the ratio's
numerator, the others get a column each).

``--variants`` adds a column per change to vitkit's step, each measured against the first
attention path in the same rounds: ``compile-model`` (the whole forward through
``torch.compile`` in one graph, as ``vitkit train --compile``; the untimed warm-up steps
compile), ``compile`` (each block compiled, as ``--compile`` does with FSDP, activation
checkpointing or progressive resizing), ``foreach`` and ``fused``
(AdamW's multi-tensor and fused implementations instead of the per-parameter loop, PyTorch's
default on CPU), ``channels-last`` (the hybrid's convolutions on NHWC tensors) and
``patch-dropout`` (the model with ``patch_dropout = --patch-dropout``: the encoder on a random
part of each image's patches, as ``vitkit train --patch-dropout``).

``--profile`` then runs ``torch.profiler`` over 3 more steps of vitkit (its first attention
path) and of Hugging Face's faster path, and prints where each step's time went: the matrix
multiplies and convolutions (the operators in ``MATMULS``, their own time) against everything
else (the element-wise operators, casts, copies, the optimizer and the Python between them).
The profiler slows every operator it records, the small ones most, so the split is what to
read there, not the milliseconds' sum. On a GPU the split sums the kernels' own device time by
the operator that launched them, and counts SDPA's fused attention kernels as matrix work.

Each row also gives its fraction of the machine's measured matrix-multiply peak: one
``torch.mm`` of ``--peak-size`` square matrices in fp32 and in bf16, against training FLOPs of
3x the forward count (``vitkit.models.flops_per_image``: backward is twice the forward). The
CPU model and its matrix features are printed, since AMX or AVX-512 bf16 decides bf16 speed.
On a GPU every tensor goes to it; the CPU's batches leave a large one idle and a 4096² product
under-states its peak, so give ``--batch 256 --peak-size 8192`` there (docs: On a GPU).

Usage: python benchmarks/train_step.py [--models vit_cifar vit_cifar_hybrid vit_ti16 vit_s16]
       [--precisions fp32 bf16] [--rounds 5] [--warmup 2] [--attn auto sdpa eager]
       [--hf-attn sdpa eager] [--variants compile compile-model foreach fused channels-last
       patch-dropout] [--patch-dropout 0.5] [--batch N] [--threads 2] [--peak-size 4096]
       [--no-hf] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F
from _common import cpu_name, device_sync, hf_model, markdown_table, matmul_peak, timed_calls
from torch import nn

from vitkit.models import ViTConfig, create_model, flops_per_image, model_config

# The operators that do a step's multiply-adds (oneDNN, BLAS or cuBLAS kernels, and on a GPU
# the fused attention kernels SDPA calls there); the rest is overhead.
MATMULS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::mkldnn_convolution",
        "aten::cudnn_convolution",
        "aten::convolution_backward",
        "aten::_flash_attention_forward",
        "aten::_flash_attention_backward",
        "aten::_efficient_attention_forward",
        "aten::_efficient_attention_backward",
        "aten::_cudnn_attention_forward",
        "aten::_cudnn_attention_backward",
    }
)

MODELS = ("vit_cifar", "vit_cifar_hybrid", "vit_ti16", "vit_s16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_batch(cfg: ViTConfig) -> int:
    """The issue's batches: 128 for the 32 px CIFAR models, 32 at 224 px."""
    return 128 if max(cfg.img_size) <= 64 else 32


def training_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str,
    **adamw: bool,
) -> Callable[[], None]:
    """One optimizer step of ``model`` on the batch (x, y), as a call to time; ``adamw``
    chooses AdamW's implementation (``foreach=True`` or ``fused=True``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **adamw)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            logits = forward(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    return step


def measure(
    name: str, precision: str, args: argparse.Namespace, device: torch.device
) -> tuple[int, dict[str, float], dict[str, Callable[[], None]]]:
    """The batch size and images/s of every candidate (vitkit per attention path, HF per one)
    and the candidates' steps."""
    cfg = model_config(name, gelu="none")
    batch = args.batch or default_batch(cfg)
    x = torch.rand(batch, cfg.in_chans, *cfg.img_size, device=device) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    steps: dict[str, Callable[[], None]] = {}
    for impl in args.attn:
        model = create_model(name, gelu="none", attn_impl=impl).to(device)
        steps[f"vitkit[{impl}]"] = training_step(model, model, x, y, precision)
    for variant in args.variants:
        dropped = {"patch_dropout": args.patch_dropout} if variant == "patch-dropout" else {}
        model = create_model(name, gelu="none", attn_impl=args.attn[0], **dropped).to(device)
        inputs, adamw = x, {}
        if variant == "compile":
            for unit in model.units():
                unit.compile()
        elif variant == "compile-model":
            model.compile()  # in place: the whole forward in one graph
        elif variant == "channels-last":
            if cfg.resnet_layers is None:
                continue  # no convolution to change
            model, inputs = (
                model.to(memory_format=torch.channels_last),
                x.contiguous(memory_format=torch.channels_last),
            )
        elif variant in ("foreach", "fused"):
            adamw = {variant: True}
        steps[f"vitkit+{variant}"] = training_step(model, model, inputs, y, precision, **adamw)
    if not args.no_hf and cfg.resnet_layers is None:
        for impl in args.hf_attn:
            hf = hf_model(cfg, impl).to(device)
            steps[f"hf[{impl}]"] = training_step(
                lambda x, hf=hf: hf(pixel_values=x).logits, hf, x, y, precision
            )
    seconds = timed_calls(steps, args.warmup, args.rounds, device_sync(device))
    return batch, {key: batch / s for key, s in seconds.items()}, steps


def time_split(
    step: Callable[[], None], device: torch.device, steps: int = 3
) -> tuple[float, float]:
    """Milliseconds a step in ``MATMULS`` and in every other operator (self times, under
    ``torch.profiler``), over ``steps`` steps after one untimed. On a GPU the times are the
    kernels' on the device (an operator's CPU time there is only its launch)."""
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        device_sync(device)()
    events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]

    def own_time(event: Any) -> float:
        return event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total

    matmul = sum(own_time(e) for e in events if e.key in MATMULS)
    total = sum(own_time(e) for e in events)
    return matmul / 1e3 / steps, (total - matmul) / 1e3 / steps


def of_peak(images_per_s: float | None, flops_per_image: float, peak: float) -> str:
    if images_per_s is None:
        return "-"
    return f"{100 * images_per_s * flops_per_image / peak:.0f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    parser.add_argument(
        "--attn",
        nargs="+",
        choices=("auto", "sdpa", "eager"),
        default=["auto"],
        help="vitkit attention paths to time; the first one is the ratio's numerator",
    )
    parser.add_argument(
        "--hf-attn",
        nargs="+",
        choices=("sdpa", "eager"),
        default=["sdpa", "eager"],
        help="Hugging Face attention paths; the faster one is the ratio's baseline",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=("compile", "compile-model", "foreach", "fused", "channels-last", "patch-dropout"),
        default=[],
        help="changes to vitkit's step, each timed beside it (see above)",
    )
    parser.add_argument(
        "--patch-dropout",
        type=float,
        default=0.5,
        help="the fraction of the patches the patch-dropout variant drops",
    )
    parser.add_argument("--batch", type=int, help="one batch size for every model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--peak-size", type=int, default=4096, help="side of the matrices of the peak's torch.mm"
    )
    parser.add_argument("--no-hf", action="store_true", help="vitkit only")
    parser.add_argument(
        "--profile", action="store_true", help="also split each step: matrix multiplies, the rest"
    )
    args = parser.parse_args()
    if args.rounds < 5:
        print(f"note: {args.rounds} rounds (the README's figures take the median of >= 5)")
    if not args.no_hf:
        try:
            import transformers
        except ImportError:
            print("the Hugging Face baseline needs transformers: pip install transformers")
            return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(f"{date.today()}; {where}; {args.threads} threads; torch {torch.__version__}", end="")
    print("" if args.no_hf else f", transformers {transformers.__version__}")
    peaks = {p: matmul_peak(DTYPES[p], device, args.peak_size) for p in args.precisions}
    for precision, peak in peaks.items():
        print(f"measured matmul peak, {precision}: {peak / 1e9:.1f} GFLOP/s")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    extra = [f"vitkit[{impl}]" for impl in args.attn[1:]]
    extra += [f"vitkit+{variant}" for variant in args.variants]
    header = ["model", "batch", "precision", "vitkit img/s", "vitkit % peak", "HF img/s"]
    header += ["HF attn", "HF % peak", "ratio", *extra]
    rows, splits = [], []
    for name in args.models:
        train_flops = 3 * flops_per_image(model_config(name))
        for precision in args.precisions:
            batch, rates, steps = measure(name, precision, args, device)
            ours = rates[f"vitkit[{args.attn[0]}]"]
            theirs = [(k[3:-1], v) for k, v in rates.items() if k.startswith("hf[")]
            hf_attn, hf_rate = max(theirs, key=lambda kv: kv[1]) if theirs else ("-", None)
            peak = peaks[precision]
            row = [name, str(batch), precision, f"{ours:.1f}", of_peak(ours, train_flops, peak)]
            row += ["-" if hf_rate is None else f"{hf_rate:.1f}", hf_attn]
            row += [of_peak(hf_rate, train_flops, peak)]
            row += ["-" if hf_rate is None else f"{ours / hf_rate:.2f}x"]
            row += [f"{rates[key]:.1f}" if key in rates else "-" for key in extra]
            rows.append(row)
            print("  " + " ".join(row), file=sys.stderr, flush=True)
            if args.profile:
                for key in (f"vitkit[{args.attn[0]}]", f"hf[{hf_attn}]"):
                    if key in steps:
                        matmul, rest = time_split(steps[key], device)
                        share = f"{100 * matmul / (matmul + rest):.0f}%"
                        splits.append([name, precision, key, f"{matmul:.0f}", f"{rest:.0f}", share])
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(markdown_table(header, rows))
    if splits:
        header = ["model", "precision", "candidate", "matmul ms", "other ms", "matmul share"]
        print("\nA step under torch.profiler (self times, ms a step):")
        print(markdown_table(header, splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
