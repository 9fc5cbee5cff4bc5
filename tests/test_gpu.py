"""CUDA smoke test: a tiny ViT computes on the GPU what it computes on the CPU (a forward pass
and a training step, in fp32 and under bf16 autocast), and ``vitkit train --device cuda``
trains. Marked ``gpu``; skipped, with the reason, where CUDA is not available."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from tests.conftest import perturbed
from vitkit.cli import main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"
    ),
]

# Relative L2 error allowed against the CPU's fp32 result. fp32 on CUDA differs by summation
# order and by the TF32 convolution of the patch embedding (10-bit mantissa, on by default);
# bf16 autocast keeps 8 bits. A wrong kernel or a device-dependent path is off by order 1.
TOLERANCE = {"fp32": 5e-3, "bf16": 5e-2}


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    result, reference = result.detach().float().cpu(), reference.detach().float()
    return float((result - reference).norm() / reference.norm())


def train_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step on a batch: the logits before it, all gradients (flattened, in parameter
    order), and the logits after it. SGD moves each weight by its gradient times the learning
    rate, so a small error in a gradient stays small in the step (Adam's normalised step would
    magnify it where a gradient is near 0)."""
    device = images.device.type
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    optimizer.step()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        after = model(images)
    return logits, grads, after


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_forward_and_train_step_match_the_cpu(precision: str) -> None:
    # vit_micro's head starts at zero: the noise gives every weight a gradient and the logits
    # something to compare. Evaluation mode: no dropout, whose random draws differ by device.
    model = perturbed(vitkit.create_model("vit_micro", num_classes=10), scale=0.1).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.randint(10, (8,), generator=g)

    reference = train_step(copy.deepcopy(model), images, labels, "fp32")
    on_gpu = train_step(model.cuda(), images.cuda(), labels.cuda(), precision)

    for name, got, want in zip(
        ["logits", "gradients", "logits after the step"], on_gpu, reference, strict=True
    ):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) < TOLERANCE[precision], name
    # the step changed the model (else the last comparison proves nothing)
    assert relative_error(reference[2], reference[0]) > 0.5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vitkit_train_on_cuda(precision: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    allocations = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    argv = ["train", "--data", "digits", "--device", "cuda", "--precision", precision]
    assert main([*argv, "--steps", "3", "--log-every", "1", "--out", str(out)]) == 0
    assert torch.cuda.memory_stats()["allocation.all.allocated"] > allocations  # on the GPU
    lines = (out / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    # the checkpoint written from the GPU loads on a machine without one
    model = vitkit.load_pretrained(out / "last.safetensors")
    images = torch.zeros(2, model.cfg.in_chans, *model.cfg.img_size)
    assert torch.isfinite(model(images)).all()
