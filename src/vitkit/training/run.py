"""The run folder: what a person reads during and after a run, and what ``--resume`` needs.

    config.json        the resolved ``TrainConfig``
    metrics.jsonl      one JSON line per logged training step and per evaluation
    last.safetensors   the model at the latest checkpoint, plus the training state to resume
                       (with --ema, the averaged weights too, under ``state/ema/``)
    best.safetensors   the model alone (and a task's own head), at the evaluation with the best
                       validation metric: for use, not to resume (runs written before this
                       version also kept the training state there; they still load); with
                       --ema, the averaged weights when they scored that best
    events.jsonl       what the --on-nonfinite policy did, one line an event
    last.dcp/          an FSDP run's checkpoint instead, sharded (``vitkit.checkpoints.sharded``);
                       its best.safetensors, and last.safetensors at the end, hold the model
                       alone, gathered whole, for everything that reads a model
    curves.png         loss and accuracy against the step
    summary.json       test accuracy, best validation accuracy, timing, confusion matrix

Checkpoints are vitkit's own one-file format (``load_pretrained`` reads them): the training
state rides along as tensors under ``state/`` (the optimizer's per-parameter buffers) and JSON
under the metadata key ``vitkit_state`` (counters, optimizer hyper-parameters, scheduler).
No pickle anywhere. Every file is written to a temporary name and renamed, so a run killed at
any moment leaves each file either old or new, never half-written (``last.dcp/`` is written as
a temporary folder and renamed); ``metrics.jsonl`` is append-only and cut back to the
checkpoint's step on resume.

A new run claims its folder (``claim_run_folder``: created atomically, so two runs never share
one); a resumed one reads its config back (``resumable_config``) after checking that nothing
it needs is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from vitkit.checkpoints import sharded
from vitkit.checkpoints.native import STATE_PREFIX, load_tensors, read_metadata, save_pretrained
from vitkit.models.registry import architecture_of
from vitkit.training import distributed
from vitkit.training.config import TrainConfig, read_run_config
from vitkit.training.distributed import Process
from vitkit.training.trackers import Tracker
from vitkit.utils.files import atomic_write
from vitkit.utils.runlayout import RunLayout

STATE_KEY = "vitkit_state"
OPTIMIZER_PREFIX = "optimizer/"
TASK_PREFIX = "task/"
EMA_PREFIX = "ema/"


@dataclass
class SavedTraining:
    """What a training checkpoint holds."""

    weights: dict[str, torch.Tensor]  # the model's state dict
    optimizer: dict[str, Any]  # for ``optimizer.load_state_dict``
    scheduler: dict[str, Any]  # for ``scheduler.load_state_dict``
    loop_state: dict[str, Any]  # the loop's counters
    task: dict[str, torch.Tensor]  # the task's own parameters
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # --ema's averaged weights


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
        self.events = self.path / "events.jsonl"
        # Copies of metrics.jsonl for TensorBoard or MLflow (``trackers.tracking`` sets them).
        self.trackers: list[Tracker] = []

    def log_event(self, event: dict[str, Any]) -> None:
        """Append what a policy did (``events.jsonl``: never cut back, unlike the metrics)."""
        if self.writer:
            with self.events.open("a") as f:
                f.write(json.dumps(event) + "\n")

    def write_json(self, path: Path, content: dict[str, Any]) -> None:
        if self.writer:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in self.trackers:
                tracker.log(record)

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
        for tracker in self.trackers:
            tracker.rewind(step)

    def save_checkpoint(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loop_state: dict[str, Any],
        is_best: bool,
        task_tensors: dict[str, torch.Tensor] | None = None,
        ema_tensors: dict[str, torch.Tensor] | None = None,
        best_model: nn.Module | None = None,
    ) -> None:
        """Write ``last.safetensors`` and, if ``is_best``, ``best.safetensors``: ``best_model``
        (default ``model``) without the training state.

        ``loop_state`` is the loop's counters (JSON); ``task_tensors`` the task's own
        parameters (a prediction head, say), kept under ``state/task/``; ``ema_tensors`` the
        averaged weights of --ema, under ``state/ema/``."""
        if not self.writer:
            return
        tensors, optimizer_json = optimizer_to_tensors(optimizer.state_dict())
        tensors |= {TASK_PREFIX + k: v for k, v in (task_tensors or {}).items()}
        tensors |= {EMA_PREFIX + k: v for k, v in (ema_tensors or {}).items()}
        state = {**loop_state, "optimizer": optimizer_json, "scheduler": scheduler.state_dict()}
        save_pretrained(model, self.last, tensors, {STATE_KEY: json.dumps(state)})
        if is_best:  # the model for use: no optimizer state (two thirds of last's bytes)
            task = {TASK_PREFIX + k: v for k, v in (task_tensors or {}).items()}
            save_pretrained(best_model or model, self.best, task)

    def save_sharded_checkpoint(
        self,
        trainable: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loop_state: dict[str, Any],
        process: Process,
    ) -> None:
        """Write ``last.dcp/``: every process its own shards of ``trainable`` and of the
        optimizer state, into a temporary folder that the main process renames when all are
        done. Every process calls it; the run folder must be on a file system they all see."""
        import torch.distributed.checkpoint as dcp  # only here: seconds to import
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(trainable, optimizer)
        temporary = self.path / f"{self.sharded_last.name}.tmp"
        if self.writer and temporary.exists():  # left by a run killed while saving
            shutil.rmtree(temporary)
        distributed.barrier(process)
        dcp.save(
            {sharded.MODEL_KEY: model_state, sharded.OPTIMIZER_KEY: optimizer_state},
            checkpoint_id=str(temporary),
        )
        if self.writer:
            prefix = next(name for name, m in trainable.named_modules() if m is model)
            state = dict(
                architecture=architecture_of(model).name,
                config=cast(Any, model).cfg.to_dict(),
                model_prefix=f"{prefix}." if prefix else "",
                parallel="fsdp",
                world_size=process.world_size,
                loop=loop_state,
                scheduler=scheduler.state_dict(),
            )
            (temporary / sharded.STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            # A directory cannot be renamed over another: move the old one aside first. A
            # kill between the two renames leaves last.dcp.old, which resuming falls back to.
            previous = self.path / f"{self.sharded_last.name}.old"
            if previous.exists():
                shutil.rmtree(previous)
            if self.sharded_last.exists():
                os.rename(self.sharded_last, previous)
            os.rename(temporary, self.sharded_last)
            shutil.rmtree(previous, ignore_errors=True)
        distributed.barrier(process)

    def load_sharded_checkpoint(
        self, path: Path, trainable: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load the sharded checkpoint ``path`` into ``trainable`` and ``optimizer`` (sharded
        by FSDP over any number of processes, or whole); returns (scheduler state, loop
        counters). Every process calls it and reads its own part."""
        import torch.distributed.checkpoint as dcp  # only here: seconds to import
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(trainable, optimizer)
        state = {sharded.MODEL_KEY: model_state, sharded.OPTIMIZER_KEY: optimizer_state}
        saved = sharded.read_state(path)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, dcp.CheckpointException) as err:  # the latter is a BaseException
            # DCP gathers each process's exception, with its traceback: keep the messages.
            failures = getattr(err, "failures", {}).values()
            reason = "; ".join(sorted({str(getattr(f, "exception", f)) for f in failures}))
            raise ValueError(
                f"{path} (saved by {saved.get('world_size')} {saved.get('parallel')} "
                f"process(es)) does not fit this run's model and optimizer: {reason or err}"
            ) from None
        set_state_dict(
            trainable,
            optimizer,
            model_state_dict=cast(Any, state[sharded.MODEL_KEY]),
            optim_state_dict=cast(Any, state[sharded.OPTIMIZER_KEY]),
        )
        return saved["scheduler"], saved["loop"]

    def save_model(self, model: nn.Module, path: Path, weights: dict[str, torch.Tensor]) -> None:
        """Write the model alone, from its gathered ``weights``, in vitkit's one-file format
        (what an FSDP run writes as best.safetensors and, at the end, last.safetensors)."""
        if self.writer:
            save_pretrained(model, path, weights=weights)

    def load_task_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """The task's own parameters saved in ``path`` (none in a model-only file)."""
        prefix = STATE_PREFIX + TASK_PREFIX
        return {
            k.removeprefix(prefix): v for k, v in load_tensors(path).items() if k.startswith(prefix)
        }

    def load_weights(self, path: Path) -> dict[str, torch.Tensor]:
        """The model's state dict in ``path``, with or without training state."""
        return {k: v for k, v in load_tensors(path).items() if not k.startswith(STATE_PREFIX)}

    def sharded_checkpoint(self) -> Path | None:
        """``last.dcp``, or the previous one when a kill came between the renames of a save."""
        previous = self.path / f"{self.sharded_last.name}.old"
        return next((p for p in (self.sharded_last, previous) if sharded.detect(p)), None)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: ``last.safetensors`` with its training state or
        ``last.dcp``, whichever is further on (a run resumed with another --parallel has
        both); None before the first checkpoint."""
        found = [p for p in (self.sharded_checkpoint(),) if p is not None]
        if self.last.is_file() and STATE_KEY in read_metadata(self.last):
            found.append(self.last)
        return max(found, key=lambda p: self.checkpoint_counters(p)["step"], default=None)

    def checkpoint_counters(self, path: Path | None = None) -> dict[str, Any]:
        """The loop's counters in a checkpoint (default: the latest), without its tensors."""
        path = path or self.latest_checkpoint()
        assert path is not None, "no checkpoint yet"
        if path.is_dir():
            return sharded.read_state(path)["loop"]
        state = json.loads(read_metadata(path)[STATE_KEY])
        return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}

    def load_checkpoint(self, path: Path | None = None) -> SavedTraining:
        """Everything ``save_checkpoint`` wrote to ``path`` (default: ``last.safetensors``)."""
        path = path or self.last
        state = json.loads(read_metadata(path)[STATE_KEY])
        tensors = load_tensors(path)
        weights = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
        saved = {
            k.removeprefix(STATE_PREFIX): v
            for k, v in tensors.items()
            if k.startswith(STATE_PREFIX)
        }
        task, ema = (
            {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
            for prefix in (TASK_PREFIX, EMA_PREFIX)
        )
        optimizer_tensors = {
            k: v for k, v in saved.items() if not k.startswith((TASK_PREFIX, EMA_PREFIX))
        }
        optimizer_state = optimizer_from_tensors(optimizer_tensors, state.pop("optimizer"))
        scheduler_state = state.pop("scheduler")
        return SavedTraining(weights, optimizer_state, scheduler_state, state, task, ema)

    def plot_curves(self) -> None:
        """Every logged metric against the optimizer step: one panel per metric, one line per
        split (training and each evaluator)."""
        if not self.writer:
            return
        # A Figure of its own (the Agg canvas), not pyplot: no global state, no display needed.
        from matplotlib.figure import Figure

        records = self.read_metrics()
        not_metrics = {"split", "epoch", "step", "lr", "images_per_second"}
        names = sorted(
            {
                k
                for r in records
                for k, v in r.items()
                if k not in not_metrics and isinstance(v, int | float)
            }
        )
        names = sorted(names, key=lambda n: (n != "loss", n))  # the loss first
        panels = max(len(names), 1)
        fig = Figure(figsize=(5.5 * panels, 4))
        axes = fig.subplots(1, panels, squeeze=False)
        splits = list(dict.fromkeys(r["split"] for r in records))
        for ax, name in zip(axes[0], names, strict=False):
            for split in splits:
                rows = [r for r in records if r["split"] == split and name in r]
                if rows:
                    style = "-" if split == "train" else "o-"
                    ax.plot(
                        [r["step"] for r in rows],
                        [r[name] for r in rows],
                        style,
                        label=split,
                        markersize=3,
                    )
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.legend()
            if name == "loss":
                ax.set_yscale("log")
        fig.tight_layout()
        atomic_write(self.curves, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def default_out(cfg: TrainConfig) -> Path:
    name = "digits" if cfg.data.source == "digits" else Path(cfg.data.source).name
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def claim_run_folder(out: Path | None, cfg: TrainConfig) -> Path:
    """Create the run folder, atomically: two runs never share one. An explicit ``out`` must
    be new or empty; the default name gets a suffix when another run took it first."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: give a folder for the run")
        if out.exists() and any(out.iterdir()):
            raise ValueError(
                f"{out} is not empty: continue that run with --resume {out}, or give another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = default_out(cfg)
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir()  # fails if another run created it, even a moment ago
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def open_run_folder(cfg: TrainConfig, process: Process) -> RunFolder:
    """Claim a new run folder: the main process creates it and every process takes its
    answer (a process that looked later would see the main process's first files)."""
    claimed: Path | str | None = None
    if process.is_main:
        try:
            claimed = claim_run_folder(Path(cfg.run.out) if cfg.run.out else None, cfg)
        except ValueError as err:
            claimed = str(err)
    claimed = distributed.broadcast_object(claimed, process)
    if isinstance(claimed, str):
        raise ValueError(claimed)
    assert claimed is not None  # the main process's folder
    return RunFolder(claimed, process.is_main)


def resumable_config(folder: Path) -> TrainConfig:
    """The config of the run in ``folder``, after checking that resuming loses nothing."""
    run = RunFolder(folder)
    if not run.holds_run():
        raise ValueError(f"{folder} holds no run to resume (no config.json there)")
    if run.latest_checkpoint() is None and (run.best.is_file() or run.read_metrics()):
        raise ValueError(
            f"{run.last} is missing (and so is {run.sharded_last.name}) although the run "
            "logged progress: resuming would start "
            f"again from step 0 and overwrite {run.best.name} and {run.metrics.name}; restore "
            "last.safetensors from a copy, or start a new run (`vitkit finetune --from "
            f"{run.best}` continues from the best model)"
        )
    return read_run_config(run.config)
