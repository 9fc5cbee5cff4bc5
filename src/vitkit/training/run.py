"""The run folder: what a person reads during and after a run, and what ``--resume`` needs.

    config.json        the resolved ``TrainConfig``
    metrics.jsonl      one JSON line per logged training step and per evaluation
    last.safetensors   the model at the latest checkpoint, plus the training state to resume
    best.safetensors   the same, at the evaluation with the best validation metric
    curves.png         loss and accuracy against the step
    summary.json       test accuracy, best validation accuracy, timing, confusion matrix

Checkpoints are vitkit's own one-file format (``load_pretrained`` reads them): the training
state rides along as tensors under ``state/`` (the optimizer's per-parameter buffers) and JSON
under the metadata key ``vitkit_state`` (counters, optimizer hyper-parameters, scheduler).
No pickle anywhere. Every file is written to a temporary name and renamed, so a run killed at
any moment leaves each file either old or new, never half-written; ``metrics.jsonl`` is
append-only and cut back to the checkpoint's step on resume.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.checkpoints.native import STATE_PREFIX, load_tensors, read_metadata, save_pretrained
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout

STATE_KEY = "vitkit_state"
OPTIMIZER_PREFIX = "optimizer/"
TASK_PREFIX = "task/"


@dataclass
class SavedTraining:
    """What a training checkpoint holds."""

    weights: dict[str, torch.Tensor]  # the model's state dict
    optimizer: dict[str, Any]  # for ``optimizer.load_state_dict``
    scheduler: dict[str, Any]  # for ``scheduler.load_state_dict``
    loop_state: dict[str, Any]  # the loop's counters
    task: dict[str, torch.Tensor]  # the task's own parameters


def optimizer_to_tensors(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able values."""
    tensors, scalars = {}, {}
    for index, buffers in state_dict["state"].items():
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    tensors: dict[str, torch.Tensor], saved: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of ``optimizer_to_tensors``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    items = [(k.removeprefix(OPTIMIZER_PREFIX), v) for k, v in tensors.items()]
    for key, value in items + list(saved["scalars"].items()):
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


class RunFolder(RunLayout):
    """The files of one run (their names: ``RunLayout``). Only the main process writes: on
    the others every write is a no-op, so the training loop calls them unconditionally."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        super().__init__(path)
        self.writer = writer

    def write_json(self, path: Path, content: dict[str, Any]) -> None:
        if self.writer:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete line of ``metrics.jsonl`` (a run killed mid-write leaves a partial)."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def cut_metrics(self, step: int) -> None:
        """Drop the lines logged after ``step``: the resumed run logs them again."""
        if not self.writer:
            return
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics, lambda tmp: tmp.write_text(text))

    def save_checkpoint(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loop_state: dict[str, Any],
        is_best: bool,
        task_tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write ``last.safetensors`` and, if ``is_best``, copy it to ``best.safetensors``.

        ``loop_state`` is the loop's counters (JSON); ``task_tensors`` the task's own
        parameters (a prediction head, say), kept under ``state/task/``."""
        if not self.writer:
            return
        tensors, optimizer_json = optimizer_to_tensors(optimizer.state_dict())
        tensors |= {TASK_PREFIX + k: v for k, v in (task_tensors or {}).items()}
        state = {**loop_state, "optimizer": optimizer_json, "scheduler": scheduler.state_dict()}
        save_pretrained(model, self.last, tensors, {STATE_KEY: json.dumps(state)})
        if is_best:
            atomic_write(self.best, lambda tmp: shutil.copyfile(self.last, tmp))

    def checkpoint_counters(self) -> dict[str, Any]:
        """The loop's counters in ``last.safetensors``, read from its metadata alone."""
        state = json.loads(read_metadata(self.last)[STATE_KEY])
        return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}

    def load_checkpoint(self, path: Path | None = None) -> SavedTraining:
        """Everything ``save_checkpoint`` wrote to ``path`` (default: ``last.safetensors``)."""
        path = path or self.last
        state = json.loads(read_metadata(path)[STATE_KEY])
        tensors = load_tensors(path)
        weights = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
        saved = {k.removeprefix(STATE_PREFIX): v for k, v in tensors.items()
                 if k.startswith(STATE_PREFIX)}  # fmt: skip
        task = {k.removeprefix(TASK_PREFIX): v for k, v in saved.items()
                if k.startswith(TASK_PREFIX)}  # fmt: skip
        optimizer_tensors = {k: v for k, v in saved.items() if not k.startswith(TASK_PREFIX)}
        optimizer_state = optimizer_from_tensors(optimizer_tensors, state.pop("optimizer"))
        scheduler_state = state.pop("scheduler")
        return SavedTraining(weights, optimizer_state, scheduler_state, state, task)

    def plot_curves(self) -> None:
        """Every logged metric against the optimizer step: one panel per metric, one line per
        split (training and each evaluator)."""
        if not self.writer:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_metrics()
        not_metrics = {"split", "epoch", "step", "lr", "images_per_second"}
        names = sorted({k for r in records for k, v in r.items()
                        if k not in not_metrics and isinstance(v, int | float)})  # fmt: skip
        names = sorted(names, key=lambda n: (n != "loss", n))  # the loss first
        fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5.5 * max(len(names), 1), 4),
                                 squeeze=False)  # fmt: skip
        splits = list(dict.fromkeys(r["split"] for r in records))
        for ax, name in zip(axes[0], names, strict=False):
            for split in splits:
                rows = [r for r in records if r["split"] == split and name in r]
                if rows:
                    style = "-" if split == "train" else "o-"
                    ax.plot([r["step"] for r in rows], [r[name] for r in rows], style,
                            label=split, markersize=3)  # fmt: skip
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
            if name == "loss":
                ax.set_yscale("log")
        fig.tight_layout()
        atomic_write(self.curves, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
