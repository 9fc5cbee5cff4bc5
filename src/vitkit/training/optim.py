"""The optimizer and the learning-rate schedule of the paper.

Pre-training: Adam (β = 0.9, 0.999) with decoupled weight decay, a linear warm-up then a
linear or cosine decay to zero. Fine-tuning: SGD with momentum 0.9, cosine decay after a
warm-up; or BiT's staircase (``"bit"``: the learning rate divided by 10 at a few chosen steps,
the schedule of BiT-HyperRule, ``training/recipes.py``). Weight decay applies to weight matrices and convolution kernels only, as the
official code's default (``.*/kernel``), not to biases, norms, position embeddings or the
class token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vitkit.training.config import TrainConfig


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the kernels of every linear and convolution layer."""
    return {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    }


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decayed = decayed_parameter_names(model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in params if name in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for name, p in params if name not in decayed], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str, drops: Sequence[int] = ()
) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of the peak.

    ``"bit"``: the peak divided by 10 for each of ``drops`` that ``step`` has reached."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "bit":
        return 0.1 ** sum(step >= drop for drop in drops)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str,
    drops: Sequence[int] = (),
) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, drops)
    )
