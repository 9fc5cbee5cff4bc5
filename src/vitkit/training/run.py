"""The run folder: what a person reads during and after a run, and what ``--resume`` needs.

    config.json        the resolved ``TrainConfig``
    metrics.jsonl      one JSON line per logged training step and per evaluation
    last.safetensors   the model after the latest epoch, plus the training state to resume
    best.safetensors   the same, for the epoch with the best validation accuracy
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
from pathlib import Path
from typing import Any

import torch

from vitkit.checkpoints.native import STATE_PREFIX, load_tensors, read_metadata, save_pretrained
from vitkit.models import VisionTransformer
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout

STATE_KEY = "vitkit_state"
OPTIMIZER_PREFIX = "optimizer/"


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
        model: VisionTransformer,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        counters: dict[str, Any],
        is_best: bool,
    ) -> None:
        """Write ``last.safetensors`` and, if ``is_best``, copy it to ``best.safetensors``."""
        if not self.writer:
            return
        tensors, optimizer_json = optimizer_to_tensors(optimizer.state_dict())
        state = {**counters, "optimizer": optimizer_json, "scheduler": scheduler.state_dict()}
        save_pretrained(model, self.last, tensors, {STATE_KEY: json.dumps(state)})
        if is_best:
            atomic_write(self.best, lambda tmp: shutil.copyfile(self.last, tmp))

    def load_checkpoint(
        self, path: Path | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """(model weights, optimizer state dict, the rest of the training state) of
        ``path`` (default: ``last.safetensors``)."""
        path = path or self.last
        state = json.loads(read_metadata(path)[STATE_KEY])
        tensors = load_tensors(path)
        weights = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
        optimizer_tensors = {
            k.removeprefix(STATE_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(STATE_PREFIX)
        }
        optimizer_state = optimizer_from_tensors(optimizer_tensors, state.pop("optimizer"))
        return weights, optimizer_state, state

    def plot_curves(self) -> None:
        """Loss and accuracy against the optimizer step, training and validation."""
        if not self.writer:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read_metrics()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for split, style in (("train", "-"), ("val", "o-")):
            rows = [r for r in records if r["split"] == split]
            if not rows:
                continue
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["loss"] for r in rows], style, label=split, markersize=3)
            axes[1].plot(steps, [r["accuracy"] for r in rows], style, label=split, markersize=3)
        for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0].set_yscale("log")
        fig.tight_layout()
        atomic_write(self.curves, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
