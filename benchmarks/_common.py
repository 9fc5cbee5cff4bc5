"""What the benchmarks share: the Hugging Face twin of a vitkit model, interleaved timing, the
machine's measured matrix-multiply peak, the CPU's name and the markdown table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vitkit.models import ViTConfig


def hf_model(cfg: ViTConfig, attn: str) -> nn.Module:
    """transformers' ``ViTForImageClassification`` with ``cfg``'s architecture (random weights).

    Exact-erf GELU on both sides (give vitkit ``gelu="none"``), a [class]-token head, square
    images and patches; there is no Hugging Face twin of the hybrid.
    """
    import transformers

    if cfg.resnet_layers is not None or cfg.classifier != "token":
        raise ValueError("transformers' ViT has no hybrid and no global-average-pool head")
    hf_cfg = transformers.ViTConfig(
        image_size=cfg.img_size[0],
        patch_size=cfg.patch_size[0],
        num_channels=cfg.in_chans,
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
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates called in turn, so a busy
    machine slows them alike."""
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


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int, repeats: int = 5) -> float:
    """FLOP/s of one big square ``torch.mm`` in ``dtype``: the most this machine's matrix
    units give PyTorch, against which a model's step is a fraction."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed_calls({"mm": lambda: torch.mm(a, b)}, 1, repeats, device_sync(device))["mm"]
    return 2 * size**3 / seconds


def cpu_name() -> str:
    """The CPU model and the matrix features that decide bf16 speed (AMX, AVX-512 bf16)."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(features) or 'no AVX-512'})"


def machine_name() -> str:
    """The GPU a run trains on, else the CPU with its cores and torch's threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
