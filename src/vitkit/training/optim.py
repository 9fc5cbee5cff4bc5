"""The optimizer and the learning-rate schedule of the paper.

Pre-training: Adam (β = 0.9, 0.999) with decoupled weight decay, a linear warm-up then a
linear or cosine decay to zero. Fine-tuning: SGD with momentum 0.9, cosine decay after a
warm-up; or BiT's staircase (``"bit"``: the learning rate divided by 10 at a few chosen steps,
the schedule of BiT-HyperRule, ``training/recipes.py``). Weight decay applies to weight matrices and convolution kernels only, as the
official code's default (``.*/kernel``), not to biases, norms, position embeddings or the
class token.

Muon (``--optimizer muon``): the weight matrices of the encoder blocks step by Muon (momentum
orthogonalised by Newton-Schulz, ``torch.optim.Muon``), every other parameter (patch
embedding, position embedding, class token, head, norms, biases) by AdamW, as Muon's authors
use it. One learning rate and weight decay serve both: Muon's step is scaled to the RMS of an
AdamW step (``adjust_lr_fn="match_rms_adamw"``, Moonshot AI's rule, "Muon is Scalable for LLM
Training", 2025), so a rate tuned for Adam carries over.

Fine-tuning options: layer-wise learning-rate decay (``--layer-decay``, BEiT's and MAE's, as
timm numbers a ViT's layers: the embeddings are layer 0, block i is layer i + 1, the final
norm and the head the last, and layer l learns at ``RATE ** (last - l)`` times the scheduled
rate) and frozen parameters (``--freeze``: no gradient, no optimizer state).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from vitkit.models import VisionTransformer
from vitkit.models.pretrained import PretrainedModel
from vitkit.training import parallel
from vitkit.training.config import TrainConfig

logger = logging.getLogger(__name__)


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the kernels of every linear and convolution layer."""
    return {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
    }


MUON_MOMENTUM = 0.95
"""Muon's momentum, its authors' and torch's default."""


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, muon_matrices: bool = True
) -> torch.optim.Optimizer:
    """The optimizer of the parameters of ``model`` that require gradients: one group per
    learning-rate scale (``lr_scales``; the largest first, so the first group's rate is the
    scheduled one), per weight decay (decayed kernels first) and, for Muon, per optimizer
    (Muon's matrices first). Without layer decay, the two groups of the weight decay split.
    ``muon_matrices=False`` has AdamW step the matrices too, as FSDP runs with Muon did
    before Muon stepped sharded matrices (2026-12-04): such a run resumes as it started."""
    decayed = decayed_parameter_names(model)
    scales = lr_scales(model, cfg.optim.layer_decay)
    muon = cfg.optim.name == "muon" and muon_matrices
    matrices = muon_parameter_names(model) if muon else set()
    if muon and not matrices:
        logger.warning(
            "--optimizer muon steps the weight matrices of a ViT's blocks; %s has none: AdamW "
            "steps all its parameters",
            type(find_model(model)[1]).__name__,
        )
    grouped: dict[tuple[float, bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (-scales.get(name, 1.0), name not in decayed, name not in matrices)
            grouped.setdefault(key, []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": 0.0 if undecayed else cfg.optim.weight_decay,
            "lr": -negative_scale * cfg.optim.lr,
            **({"muon": not adamw} if cfg.optim.name == "muon" else {}),
        }
        for (negative_scale, undecayed, adamw), params in sorted(grouped.items())
    ]
    if cfg.optim.name == "adam":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    if cfg.optim.name == "muon":
        return MuonWithAdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)


def muon_parameter_names(module: nn.Module) -> set[str]:
    """The parameters of the model inside ``module`` that Muon steps: the weight matrices of
    its encoder blocks (attention and MLP kernels; not the embeddings or the head, which see
    one token or one class at a time, nor a block's other tensors). None in a model without
    blocks (``build_optimizer`` says so in the log: AdamW steps everything then)."""
    prefix, model = find_model(module)
    if not isinstance(model, VisionTransformer):
        return set()
    kernels = decayed_parameter_names(model)
    return {
        prefix + name
        for name, p in model.named_parameters()
        if name.startswith("blocks.") and name in kernels and p.ndim == 2
    }


# Muon's Newton-Schulz iteration as torch.optim.Muon (and Keller Jordan's reference) runs it:
# a quintic with these coefficients, five steps in bfloat16, from the update divided by its norm.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
NEWTON_SCHULZ_EPS = 1e-7


def orthogonalise(updates: torch.Tensor) -> torch.Tensor:
    """``updates`` (a stack of equal-shape matrices, ``(n, rows, columns)``) made nearly
    orthogonal by ``NEWTON_SCHULZ_STEPS`` quintic Newton-Schulz steps, in bfloat16."""
    a, b, c = NEWTON_SCHULZ
    x = updates.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NEWTON_SCHULZ_EPS)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``"muon": True``, AdamW (``torch.optim.AdamW``, stepping
    the same group dicts and keeping its buffers in this optimizer's state) for the others:
    one optimizer to the schedule, the gradient scaler and the checkpoints.

    Muon's step is ``torch.optim.Muon``'s (Nesterov momentum, ``orthogonalise``, decoupled
    weight decay, ``adjust_lr_fn="match_rms_adamw"``) done for all the matrices of one shape
    at once: a model's blocks share a few shapes, so a step runs a few batched iterations
    instead of one per matrix, which dominates a small model's step.

    Under FSDP the parameters, gradients and momentum are ``DTensor`` shards. Momentum is
    element-wise and stays sharded; the orthogonalisation needs each whole matrix, so every
    process gathers the Nesterov updates (one all-gather per matrix, the size of FSDP's own
    gather of the weights), orthogonalises them all and keeps its own rows: the same numbers,
    bit for bit, as one process stepping the whole model."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> None:
        others = [g for g in groups if not g["muon"]]
        # AdamW fills its defaults into its groups (the same dicts as below).
        self._adamw = torch.optim.AdamW(others or [{"params": []}], lr=lr, betas=betas)
        super().__init__(groups, {"lr": lr, "momentum": MUON_MOMENTUM})
        self._link()

    def _link(self) -> None:
        self._adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the group dicts and the state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
        self._adamw.step()
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_shape.setdefault(p.shape, []).append((p, p.grad))
        for shape, pairs in by_shape.items():
            nesterov = []
            for p, grad in pairs:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                state["momentum_buffer"].lerp_(grad, 1 - momentum)
                nesterov.append(
                    parallel.whole_tensor(grad.lerp(state["momentum_buffer"], momentum))
                )
            updates = orthogonalise(torch.stack(nesterov))
            scaled_lr = lr * 0.2 * math.sqrt(max(shape))  # the RMS of an AdamW update
            for (p, _), update in zip(pairs, updates, strict=True):
                p.mul_(1 - lr * decay)
                p.add_(parallel.shard_like(update, p), alpha=-scaled_lr)


def find_model(module: nn.Module) -> tuple[str, PretrainedModel]:
    """The vitkit model inside ``module`` (a task may wrap it, ``Task.trainable``) and the
    prefix of its parameters' names there."""
    for name, inner in module.named_modules():
        if isinstance(inner, PretrainedModel):
            return (f"{name}." if name else ""), inner
    raise ValueError(f"{type(module).__name__} holds no vitkit model")


def layer_ids(model: PretrainedModel) -> dict[str, int]:
    """The layer of each parameter of ``model`` (by its name there), as timm's ViT
    ``group_matcher`` numbers them: 0 the embeddings (patch embedding, a hybrid's ResNet,
    class token, position embedding), i + 1 block i, depth + 1 the rest (final norm,
    pre-logits, head). Only a ViT has blocks to number."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"--layer-decay and --freeze N number the blocks of a ViT (or hybrid); "
            f"{type(model).__name__} has none: train it without them (--freeze backbone works)"
        )
    last = len(model.blocks) + 1
    ids = {}
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            ids[name] = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed.", "cls_token", "pos_embed.")):
            ids[name] = 0
        else:
            ids[name] = last
    return ids


def lr_scales(module: nn.Module, rate: float | None) -> dict[str, float]:
    """The learning-rate factor of each parameter of the model inside ``module`` under layer
    decay ``rate`` (the module docstring); empty without it, and parameters of a task's own
    (outside the model) learn at the scheduled rate."""
    if rate is None or rate == 1.0:
        return {}
    prefix, model = find_model(module)
    ids = layer_ids(model)
    last = max(ids.values())
    return {prefix + name: rate ** (last - layer) for name, layer in ids.items()}


def describe_layer_decay(module: nn.Module, rate: float) -> str:
    """One line for the log: the factor of each layer of the model inside ``module``."""
    _, model = find_model(module)
    last = max(layer_ids(model).values())
    names = ["embeddings", *(f"block {i}" for i in range(last - 1)), "head"]
    return f"layer decay {rate:g}: " + ", ".join(
        f"{name} x{rate ** (last - layer):.3g}" for layer, name in enumerate(names)
    )


def frozen_names(model: PretrainedModel, freeze: str) -> set[str]:
    """The parameters of ``model`` that ``--freeze`` keeps as they are: all but the head and
    pre-logits (``"backbone"``), or the embeddings and the first N blocks (``"N"``)."""
    if freeze == "backbone":
        heads = ("head.", "pre_logits.")
        return {name for name, _ in model.named_parameters() if not name.startswith(heads)}
    blocks, ids = int(freeze), layer_ids(model)
    depth = max(ids.values()) - 1
    if blocks > depth:
        raise ValueError(
            f"--freeze {blocks}: the model has {depth} blocks; freeze at most {depth}, or "
            "--freeze backbone"
        )
    return {name for name, layer in ids.items() if layer <= blocks}


def freeze_parameters(module: nn.Module, freeze: str) -> str:
    """Stop the gradients of the parameters ``frozen_names`` picks in the model inside
    ``module`` (call before DDP or FSDP wrap it, and before ``build_optimizer``, which then
    leaves them out); returns a line for the log."""
    _, model = find_model(module)
    frozen = frozen_names(model, freeze)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"--freeze {freeze} leaves nothing to train: the model has no head")
    count = sum(p.numel() for name, p in model.named_parameters() if name in frozen)
    blocks = "block" if freeze == "1" else "blocks"
    what = "all but the head" if freeze == "backbone" else f"the embeddings and {freeze} {blocks}"
    return f"frozen: {what} ({count:,} parameters)"


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
