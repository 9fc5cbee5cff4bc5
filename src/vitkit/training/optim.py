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
from typing import Any, cast

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
        {
            "params": [p for name, p in params if name in decayed],
            "weight_decay": cfg.optim.weight_decay,
        },
        {"params": [p for name, p in params if name not in decayed], "weight_decay": 0.0},
    ]
    if cfg.optim.name == "adam":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str, drops: Sequence[int] = ()
) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of the peak.

    ``"bit"``: the peak divided by 10 for each of ``drops`` that ``step`` has reached."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "bit":
        return 0.1 ** sum(step >= drop for drop in drops)
    return decayed((step - warmup_steps) / max(total_steps - warmup_steps, 1), schedule)


class SchedulePlan:
    """The learning-rate factor of each step, as a callable ``LambdaLR`` reads: the configured
    schedule (``lr_factor``) until ``refit`` fits it to another length.

    A time-boxed run (``--max-minutes``) cannot know its length before it has measured its
    speed, so the loop refits the plan as it goes. A refit never makes the learning rate
    jump: from the step it is made at, the warm-up ramps from the current value to the peak
    by the new warm-up's end, and the decay goes on from its current point to its end value
    at the new last step. ``LambdaLR`` saves a callable object's attributes in its state
    dict, so the plan (and its ``history``) rides in every checkpoint and a resumed run
    continues it exactly; a checkpoint from before plans existed leaves the configured one.
    """

    def __init__(
        self, warmup_steps: int, total_steps: int, schedule: str, drops: Sequence[int] = ()
    ) -> None:
        self.configured_warmup, self.configured_steps = warmup_steps, total_steps
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule = schedule
        self.drops = list(drops)
        self.lr_scale = 1.0  # lowered by each rollback after a non-finite loss
        self.anchor_step = 0  # the first step of the current fit; 0 = the configured plan
        self.anchor_value = 0.0  # the factor of the step before it
        self.anchor_progress = 0.0  # the decay's progress (0..1) at the step before it
        self.history: list[dict[str, Any]] = []  # the refits: step, totals, reason

    def __call__(self, step: int) -> float:
        return self.lr_scale * self.unscaled(step)

    def unscaled(self, step: int) -> float:
        anchor, warmup = self.anchor_step, self.warmup_steps
        if anchor == 0 or self.schedule == "bit":  # the configured plan, as it always was
            return lr_factor(step, warmup, self.total_steps, self.schedule, self.drops)
        if step < warmup:
            ramp = (step - anchor + 1) / (warmup - anchor)
            return self.anchor_value + (1 - self.anchor_value) * ramp
        return decayed(min(self.progress(step), 1.0), self.schedule)

    def progress(self, step: int) -> float:
        """How far the decay is at ``step``: 0 up to its start, 1 at its end."""
        if step < self.warmup_steps:
            return 0.0
        start = max(self.anchor_step - 1, self.warmup_steps)
        fraction = (step - start) / max(self.total_steps - start, 1)
        return self.anchor_progress + (1 - self.anchor_progress) * fraction

    def refit(self, step: int, total_steps: int, warmup_steps: int, **why: Any) -> None:
        """From optimizer step ``step`` on (``step`` steps done), end at ``total_steps`` with a
        warm-up that ends at ``warmup_steps`` (never before ``step + 1`` while warming up);
        ``why`` goes into ``history``."""
        if step >= self.warmup_steps:
            warmup_steps = self.warmup_steps  # the warm-up is over: it stays as it was
        else:
            warmup_steps = max(warmup_steps, step + 1)
        value = self.unscaled(step - 1) if step > 0 else 0.0
        progress = self.progress(step - 1) if step > 0 else 0.0
        self.anchor_step, self.anchor_value, self.anchor_progress = step, value, progress
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, step)
        self.history.append(
            dict(step=step, total_steps=self.total_steps, warmup_steps=warmup_steps, **why)
        )

    def describe(self) -> dict[str, Any]:
        """The plan for summary.json: its steps as configured and as fitted, and each refit."""
        return dict(
            schedule=self.schedule,
            configured_steps=self.configured_steps,
            configured_warmup_steps=self.configured_warmup,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            lr_scale=self.lr_scale,
            refits=self.history,
        )


def decayed(progress: float, schedule: str) -> float:
    """The factor after the warm-up, ``progress`` (0..1) through the decay."""
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    drops: Sequence[int] = (),
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose factor is a ``SchedulePlan`` (``schedule_plan`` finds it)."""
    plan = SchedulePlan(warmup_steps, total_steps, schedule, drops)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan)


def apply_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set the learning rate of the next step from the plan, after the plan changed."""
    factor = schedule_plan(scheduler)(scheduler.last_epoch)
    optimizer = scheduler.optimizer
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor
    cast(Any, scheduler)._last_lr = [group["lr"] for group in optimizer.param_groups]


def schedule_plan(scheduler: torch.optim.lr_scheduler.LRScheduler) -> SchedulePlan:
    return cast(SchedulePlan, cast(Any, scheduler).lr_lambdas[0])
