"""The training loop, top to bottom: ``train(cfg)`` runs (or resumes) a run and returns its
summary. Fine-tuning is the same loop starting from a checkpoint (``cfg.model.init_from``).

What is learnt is the task's business (``tasks.py``), what is measured the evaluators'
(``evaluators.py``) and where the images come from the data source's (``data/sources.py``);
the loop only steps, logs, evaluates and checkpoints.

Reproducibility: the data order depends on (seed, epoch), and every random draw of a
micro-batch (augmentation, dropout, stochastic depth) comes from a seed derived from (seed,
step, micro-batch, rank). A checkpoint taken after any optimizer step therefore fixes
everything that follows: resuming from it, also in the middle of an epoch, gives bit-identical
weights on the same hardware.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from vitkit.checkpoints import sharded
from vitkit.data.sources import Batch, DataSource, Splits, open_splits
from vitkit.evaluation.inference import autocast
from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.models.pretrained import PretrainedModel
from vitkit.training import distributed, parallel
from vitkit.training.config import DEFAULT_BATCH_SIZE, EvaluatorsConfig, TrainConfig
from vitkit.training.distributed import Process
from vitkit.training.ema import WeightAverage
from vitkit.training.evaluators import (
    EvalContext,
    Evaluator,
    build_evaluators,
    monitored_metric,
)
from vitkit.training.model_choice import choose_model, image_side
from vitkit.training.optim import (
    SchedulePlan,
    apply_schedule,
    build_optimizer,
    build_schedule,
    describe_layer_decay,
    freeze_parameters,
    muon_parameter_names,
    schedule_plan,
)
from vitkit.training.resizing import size_multiple, training_size
from vitkit.training.run import (  # the run-folder functions' home was here
    RunFolder,
    SavedTraining,
    open_run_folder,
    resumable_config,
)
from vitkit.training.run import claim_run_folder as claim_run_folder
from vitkit.training.run import default_out as default_out
from vitkit.training.tasks import Task, build_task
from vitkit.training.trackers import tracking
from vitkit.utils.allocator import keep_freed_memory
from vitkit.utils.devices import check_compiler

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped, its last checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (or SIGTERM) stopped the run; the message says how to continue it."""


@dataclass
class LoopState:
    """Everything the loop counts, saved whole in each checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    best_value: float | None = None  # the best validation value of the task's metric
    best_step: int | None = None
    best_epoch: float | None = None  # in epochs, fractional for an evaluation mid-epoch
    train_images: int = 0
    train_seconds: float = 0.0  # time in training steps (not evaluating or checkpointing)
    wall_seconds: float = 0.0
    # What the --on-nonfinite policy did: one dict per non-finite step (``nonfinite_event``).
    nonfinite_events: list[dict[str, Any]] = field(default_factory=list)
    best_weights: str = "raw"  # what best.safetensors holds: "raw", or "ema" (--ema's average)
    evals_without_improvement: int = 0  # of the best evaluator, for --patience
    stopped_early: bool = False  # by --patience
    train_size: list[int] | None = None  # progressive resizing's image size (never shrinks)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


Progress = Callable[[int, int, dict[str, Any] | None], None]
"""``progress(step, total_steps, logged_record_or_None)``, called after each optimizer step."""
StepHook = Callable[[int, nn.Module, torch.optim.Optimizer], None]
"""``hook(step, model, optimizer)``, called right after each optimizer step that updated the
weights (not after one skipped for a non-finite gradient), before the gradients are zeroed
and the learning rate moves on: ``step`` counts the optimizer steps taken, this one included;
``model`` is the model that checkpoints hold. What a hook keeps (an EMA teacher's weights) is
its own: checkpoints do not save it, so a resumed run starts it again."""

# Settings a resumed run may change: how it runs (and what it does about a non-finite loss),
# not what it learns; all of them in the config's [run] section.
RESUME_OPTIONS = (
    "parallel",
    "activation_checkpointing",
    "compile",
    "on_nonfinite",
    "max_skipped_steps",
    "max_rollbacks",
    "log_to",
)
# --on-nonfinite rollback multiplies the learning rate by this at each rollback.
ROLLBACK_LR_FACTOR = 0.5
# --precision fp16: a non-finite gradient is an overflow for the gradient scaler to skip (and
# halve its scale) while its scale is at least this; below it, no scale makes the gradients
# finite (the loss itself is not): --on-nonfinite decides.
MIN_LOSS_SCALE = 1.0

# The loop's parts as ranges a ``torch.profiler`` run records (``record_function``), so a
# profile shows where a step's time goes (``benchmarks/loop_breakdown.py`` tabulates them).
STAGES = {
    "data": "vitkit.data",  # the next batch from the data source
    "augment": "vitkit.augment",  # to the device, the task's preparation (augmentation)
    "forward_backward": "vitkit.forward_backward",
    "clip": "vitkit.clip",  # the gradients' norm, clipping
    "optimizer": "vitkit.optimizer",
    "evaluate": "vitkit.evaluate",
    "checkpoint": "vitkit.checkpoint",
}


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint32)[0])


def train(
    cfg: TrainConfig | None = None,
    resume: str | Path | None = None,
    progress: Progress | None = None,
    resume_options: dict[str, Any] | None = None,
    step_hooks: list[StepHook] | None = None,
) -> dict[str, Any]:
    """Train (``cfg``) or continue the run in folder ``resume``, changing only the
    ``RESUME_OPTIONS`` in ``resume_options``; returns ``summary.json``'s content. Raises
    ValueError, before any training, for a bad config or data. ``step_hooks`` are called
    after every optimizer step (``StepHook``).

    Workers that torchrun restarted (``--max-restarts``) continue the run in ``cfg.run.out``
    from its last checkpoint, without being told to."""
    out = cfg.run.out if cfg is not None else None
    if resume is None and out and distributed.restarted() and RunFolder(out).holds_run():
        logger.warning("restarted by torchrun: resuming the run in %s", out)
        resume = out
    if resume is not None:
        cfg = resumable_config(Path(resume))
        unknown = sorted(set(resume_options or {}) - set(RESUME_OPTIONS))
        if unknown:
            raise ValueError(f"a resumed run can only change {RESUME_OPTIONS}, not {unknown}")
        cfg = cfg.replace(run=resume_options or {})  # every RESUME_OPTION is in [run]
    cfg = cfg or TrainConfig()
    process = distributed.start(cfg.run.device, sharded=cfg.run.parallel == "fsdp")
    try:
        folder = Path(resume) if resume is not None else None
        return _train(cfg, folder, process, progress, resume_options, step_hooks or [])
    finally:
        distributed.stop(process)


def _train(
    cfg: TrainConfig,
    resume: Path | None,
    process: Process,
    progress: Progress | None,
    resume_options: dict[str, Any] | None,
    step_hooks: list[StepHook],
) -> dict[str, Any]:
    # ---- data, model, task and evaluators, checked before anything is trained or written
    splits = open_splits(
        cfg.data.source,
        cfg.data.val_fraction,
        cfg.run.seed,
        cfg.data_options,
        train_fraction=cfg.data.train_fraction,
    )
    if cfg.model.name is None and cfg.model.init_from is None:
        cfg = with_chosen_model(cfg, splits, process)
    task = build_task(cfg)
    if task.needs_labels and splits.train.info.classes is None:
        raise ValueError(
            f"{cfg.data.source} has no labels (its images are not in class folders): the {cfg.task.name} "
            f"task needs them. Put each class's images in a folder of its own "
            f"({cfg.data.source}/<class>/<image>), or pre-train on it: `vitkit pretrain --data {cfg.data.source}`"
        )
    cfg = with_batch_size(cfg, splits.train, process)
    check_batch_sizes(cfg, splits.train, process)
    on_gpu = process.device.type == "cuda"
    if cfg.run.precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16: use --precision fp32")
    if cfg.run.precision == "fp16" and not on_gpu:
        raise ValueError("fp16 needs a CUDA GPU: use --precision bf16 on CPU")
    if cfg.run.precision == "fp16" and cfg.run.parallel == "fsdp":
        raise ValueError("--precision fp16 does not work with --parallel fsdp: use bf16")
    if cfg.run.compile:
        check_compiler(process.device)
    if cfg.run.keep_freed_memory:
        keep_freed_memory()
    if cfg.optim.ema and cfg.run.parallel == "fsdp":
        raise ValueError("--ema keeps a whole copy of the weights: use --parallel ddp, not fsdp")
    evaluators = build_evaluators(EvalContext(cfg, task, splits))
    if cfg.evaluators.patience and not any(e.name == cfg.evaluators.best for e in evaluators):
        raise ValueError(
            f"--patience watches the {cfg.evaluators.best!r} evaluator, which does not run in "
            "this run: give a validation split (--val-fraction 0.1) or name a running one "
            "with --best-evaluator"
        )
    if resume is not None:
        run = RunFolder(resume, process.is_main)
    else:
        if cfg.run.out and Path(cfg.run.out).is_file():  # before building the model: fail fast
            raise ValueError(f"--out {cfg.run.out} is a file: give a folder for the run")
        run = open_run_folder(cfg, process)
        cfg = cfg.replace(run={"out": str(run.path)})

    # ---- model, optimizer, schedule; restored from the last checkpoint when resuming
    session = Session.build(cfg, process, run, task, splits, evaluators, resume is not None)
    session.step_hooks.extend(step_hooks)  # after the loop's own (--ema)
    if resume is not None:  # from step 0 if the run was stopped before its first checkpoint
        run.cut_metrics(session.state.step)
        if process.is_main:
            logger.info(
                "resuming %s at step %d of %d, epoch %d",
                run.path,
                session.state.step,
                session.total_steps,
                session.state.epoch,
            )
    if resume is None or resume_options:  # a resumed run's, with the RESUME_OPTIONS it changed
        run.write_json(run.config, cfg.to_dict())
    session.log_start()
    if cfg.model.init_from is not None and cfg.model.img_size is None and process.is_main:
        logger.info(finetune_resolution_note(session.model.cfg.img_size, splits.train))

    # ---- the loop: one optimizer step per ``accum_steps`` micro-batches
    with tracking(cfg.run.log_to, run, cfg.to_dict(), session.state.step):
        try:
            session.train(progress)
        except KeyboardInterrupt:
            raise TrainingInterrupted(interrupted_message(run, session.state.step)) from None

        # ---- test the best checkpoint, write the summary
        return session.finish()


@dataclass
class Session:
    """One process's part of a run while it trains: what ``_train`` sets up, and the steps,
    evaluations and checkpoints of the loop. ``state`` is what a checkpoint saves."""

    cfg: TrainConfig
    process: Process
    run: RunFolder
    task: Task
    splits: Splits
    evaluators: list[Evaluator]
    model: PretrainedModel  # what checkpoints hold
    trainable: nn.Module  # the model and the task's own parameters
    net: nn.Module  # ``trainable`` as DDP or FSDP wrap it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: LoopState
    steps_per_epoch: int
    started: float = field(default_factory=time.perf_counter)  # this session, less the earlier
    segment_start: float = field(default_factory=time.perf_counter)  # of training steps
    logged: dict[str, torch.Tensor] = field(default_factory=dict)  # sums since the last line
    line_images: int = 0  # ``state.train_images`` at the last line (or the restored checkpoint)
    time_up: bool = False  # the --max-minutes budget is spent: stop after this step
    # (step, training seconds) after this session's first step, whose time (data loading
    # starting, lazy initialisation) says little about the speed of the others.
    first_step: tuple[int, float] | None = None
    step_hooks: list[StepHook] = field(default_factory=list)  # after each optimizer step
    # --precision fp16's loss scaling; disabled (every call passes through) otherwise.
    scaler: torch.amp.GradScaler = field(
        default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False)
    )
    frozen: str = ""  # what --freeze froze, for the log
    averaged: WeightAverage | None = None  # --ema's average of the weights

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        process: Process,
        run: RunFolder,
        task: Task,
        splits: Splits,
        evaluators: list[Evaluator],
        resuming: bool,
    ) -> Session:
        """The model, optimizer and schedule, restored from the run's latest checkpoint when
        ``resuming``."""
        steps_per_epoch = len(splits.train) // cfg.optim.global_batch_size
        total_steps = cfg.schedule.steps or cfg.schedule.epochs * steps_per_epoch
        torch.manual_seed(cfg.run.seed)
        model = task.build_model(splits.train.info).to(process.device)
        splits.set_image_size(model.cfg.img_size, EvalPreprocessing.of(model.cfg))
        task.setup(model)
        trainable = task.trainable(model)
        frozen = freeze_parameters(trainable, cfg.optim.freeze) if cfg.optim.freeze else ""
        # The main process picks the checkpoint (other nodes may not see its disk) and reads
        # a whole one (last.safetensors) before the model is spread over the processes.
        latest, saved = read_latest_checkpoint(run, process) if resuming else (None, None)
        if saved is not None:
            model.load_state_dict(saved.weights)
            task.load_task_state(trainable, saved.task)
        net = parallel.wrap(trainable, cfg, process)
        optimizer = build_optimizer(trainable, cfg, muon_stepped(cfg, trainable, latest, saved))
        warmup_steps = warmup_length(cfg, steps_per_epoch, total_steps)
        scheduler = build_schedule(
            optimizer, warmup_steps, total_steps, cfg.schedule.name, cfg.schedule.lr_drops
        )
        session = cls(
            cfg,
            process,
            run,
            task,
            splits,
            evaluators,
            model,
            trainable,
            net,
            optimizer,
            scheduler,
            LoopState(),
            steps_per_epoch,
            scaler=torch.amp.GradScaler(process.device.type, enabled=cfg.run.precision == "fp16"),
            frozen=frozen,
        )
        if cfg.optim.ema:
            session.averaged = WeightAverage(model, cfg.optim.ema)
            session.step_hooks.append(session.averaged)
        if latest is not None:
            session.restore(latest, saved)
        session.started -= session.state.wall_seconds
        if cfg.schedule.resize_start < 1:  # refuse a model or task that cannot resize
            size_multiple(model)
            reached = session.state.train_size  # a resumed run's size
            task.set_train_size((reached[0], reached[1]) if reached else model.cfg.img_size)
        return session

    @property
    def plan(self) -> SchedulePlan:
        return schedule_plan(self.scheduler)

    @property
    def total_steps(self) -> int:
        """The steps of the run as planned now (a time budget refits the plan as it goes)."""
        return self.plan.total_steps

    def restore(self, latest: Path, saved: SavedTraining | None) -> None:
        """Load the optimizer, schedule and counters of checkpoint ``latest``: ``saved``, or
        for a sharded checkpoint (``saved`` None) each process's part of it, weights too."""
        if saved is not None:
            parallel.load_optimizer_state(self.optimizer, self.trainable, saved.optimizer)
            scheduler_state, loop_state = saved.scheduler, saved.loop_state
            if self.averaged is not None:
                self.averaged.load_state_dict(saved.ema)
        else:  # last.dcp: every process reads its own part
            scheduler_state, loop_state = self.run.load_sharded_checkpoint(
                latest, self.trainable, self.optimizer
            )
        self.scheduler.load_state_dict(scheduler_state)
        if "grad_scaler" in loop_state:
            self.scaler.load_state_dict(loop_state["grad_scaler"])
        restored = LoopState.from_dict(loop_state)
        for name in (f.name for f in dataclasses.fields(LoopState)):
            setattr(self.state, name, getattr(restored, name))
        self.line_images = self.state.train_images

    def log_start(self) -> None:
        cfg, process = self.cfg, self.process
        if process.is_main:
            logger.info(
                "training %s-parameter %s (%s) on %s: %s, %.4g epochs of %d steps, %d "
                "process(es) on %s (%s%s); run folder %s",
                f"{num_parameters(self.model):,}",
                cfg.model.name or cfg.model.init_from,
                cfg.task.name,
                cfg.data.source,
                describe_splits(self.splits),
                self.total_steps / self.steps_per_epoch,
                self.steps_per_epoch,
                process.world_size,
                process.device.type,
                cfg.run.parallel,
                ", activation checkpointing" if cfg.run.activation_checkpointing else "",
                self.run.path,
            )
            if cfg.optim.layer_decay not in (None, 1.0):
                logger.info(describe_layer_decay(self.trainable, cfg.optim.layer_decay))
            if self.frozen:
                logger.info(self.frozen)

    def train(self, progress: Progress | None) -> None:
        """Step until the run's end (or its time budget), logging, evaluating and
        checkpointing on the way."""
        cfg, state = self.cfg, self.state
        # A budget is checked after each step; here only what earlier sessions spent counts,
        # so a run always takes at least one step.
        while (
            not state.stopped_early
            and state.step < self.total_steps
            and not self.out_of_time(this_segment=False)
        ):
            epoch, offset = divmod(state.step, self.steps_per_epoch)
            epoch_end = (epoch + 1) * self.steps_per_epoch
            batches = self.splits.train.train_batches(
                cfg.optim.micro_batch_size // self.process.world_size,
                seed=cfg.run.seed,
                epoch=epoch,
                start=offset * cfg.optim.accum_steps,
                rank=self.process.rank,
                world_size=self.process.world_size,
            )
            self.trainable.train()
            while state.step < min(epoch_end, self.total_steps):
                if not self.step(batches):
                    break  # rolled back to the last checkpoint: start its epoch's data again
                epoch_done = state.step % self.steps_per_epoch == 0
                state.epoch += epoch_done
                stop = self.time_up
                eval_due = (
                    stop
                    or state.step == self.total_steps
                    or (
                        state.step % cfg.evaluators.every == 0
                        if cfg.evaluators.every
                        else epoch_done
                    )
                )
                checkpoint_due = (
                    eval_due
                    or epoch_done
                    or (cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0)
                )
                record = None
                if state.step % cfg.run.log_every == 0 or checkpoint_due:
                    # Also before each checkpoint, so a resumed run logs the same lines.
                    record = self.log(epoch)
                if progress is not None:
                    progress(state.step, self.total_steps, record)
                if not checkpoint_due:
                    continue
                is_best = False
                if eval_due:
                    with parallel.whole(self.trainable), record_function(STAGES["evaluate"]):
                        is_best = run_evaluators(
                            self.evaluators,
                            self.task,
                            self.model,
                            self.run,
                            self.process,
                            state,
                            self.steps_per_epoch,
                            cfg.evaluators.best,
                            self.averaged.model if self.averaged is not None else None,
                            cfg.evaluators,
                        )
                picks = any(e.name == cfg.evaluators.best for e in self.evaluators)
                if not picks:  # best = last: with --ema, its average
                    state.best_weights = "raw" if self.averaged is None else "ema"
                patience = cfg.evaluators.patience
                state.stopped_early = bool(patience) and state.evals_without_improvement >= patience
                with record_function(STAGES["checkpoint"]):
                    self.checkpoint(is_best or not picks)
                self.segment_start = time.perf_counter()
                if state.stopped_early:
                    if self.process.is_main:
                        logger.info(
                            "no better %s in %d evaluations (the best at step %d): stopping "
                            "early at step %d of %d, testing",
                            cfg.evaluators.best,
                            patience,
                            state.best_step,
                            state.step,
                            self.total_steps,
                        )
                    return
                if stop:
                    logger.info(
                        "the %g-minute budget is spent after step %d of %d: testing",
                        cfg.schedule.max_minutes,
                        state.step,
                        self.total_steps,
                    )
                    return
        if self.plan.history and self.process.is_main:
            logger.info(
                "the %g-minute budget fitted the schedule to %d steps (of %d configured)",
                cfg.schedule.max_minutes,
                state.step,
                self.plan.configured_steps,
            )

    def resize(self) -> None:
        """Progressive resizing: set the task's training image size for this point of the
        run. A new size restarts the time budget's speed measurement (its steps take
        another time), so the schedule is fitted at the full size by the run's end. The size
        never shrinks: a refit that lengthens the run moves its progress back, and would
        otherwise send the images back to a size already left."""
        schedule = self.cfg.schedule
        height, width = training_size(
            self.model.cfg.img_size,
            size_multiple(self.model),
            schedule.resize_start,
            schedule.resize_ramp,
            self.state.step / self.total_steps,
        )
        reached = self.state.train_size
        if reached is not None:
            height, width = max(height, reached[0]), max(width, reached[1])
            if [height, width] == reached:
                return
        size = (height, width)
        self.task.set_train_size(size)
        self.state.train_size, self.first_step = [height, width], None
        if self.process.is_main:
            logger.info("training at %dx%d px from step %d", *size, self.state.step)

    def step(self, batches: Iterator[Batch]) -> bool:
        """One optimizer step: ``accum_steps`` micro-batches, each with its own seeds. False
        when a non-finite loss rolled the run back to its last checkpoint."""
        cfg, state, device = self.cfg, self.state, self.process.device
        if cfg.schedule.resize_start < 1:
            self.resize()
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.optim.accum_steps):
            with record_function(STAGES["data"]):
                batch = next(batches)
            seed = derived_seed(cfg.run.seed, state.step, micro, self.process.rank)
            torch.manual_seed(seed)  # dropout and stochastic depth
            with record_function(STAGES["augment"]):
                batch = dataclasses.replace(batch, images=batch.images.to(device))
                inputs, targets = self.task.prepare(batch, derived_seed(seed, 1))
            with (
                record_function(STAGES["forward_backward"]),
                parallel.gradient_sync(self.net, micro == cfg.optim.accum_steps - 1),
            ):
                with autocast(device, cfg.run.precision):
                    result = self.task.step(self.net, inputs, targets)
                self.scaler.scale(result.loss / cfg.optim.accum_steps).backward()
            for name, value in result.sums.items():
                sums[name] = sums.get(name, 0) + value.detach().double()
            sums["count"] = sums.get("count", 0) + torch.tensor(
                result.count, dtype=torch.float64, device=device
            )
        # The norm of the gradients every process holds after DDP averaged them (or FSDP's
        # global norm): every process takes the same decision.
        with record_function(STAGES["clip"]):
            self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, to clip
            grad_norm = clip_gradients(self.trainable, cfg.optim.grad_clip)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            with record_function(STAGES["optimizer"]):
                self.scaler.step(self.optimizer)
            for hook in self.step_hooks:
                hook(state.step + 1, self.model, self.optimizer)
            for name, value in sums.items():
                self.logged[name] = self.logged.get(name, 0) + value
        scaled = self.scaler.is_enabled()
        overflow = not finite and scaled and self.scaler.get_scale() >= MIN_LOSS_SCALE
        self.scaler.update()  # after an overflow, a smaller scale
        if not (finite or overflow) and self.on_nonfinite(result.loss.item()) == "rolled back":
            return False
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.train_images += cfg.optim.global_batch_size
        self.time_up = self.fit_to_budget()  # before the schedule steps: the next LR follows it
        self.scheduler.step()
        return True

    def on_nonfinite(self, loss: float) -> str:
        """Apply the --on-nonfinite policy to a step whose loss or gradients are not finite;
        returns what was done ("skipped", "rolled back") or raises ``TrainingDiverged``."""
        cfg, state, run = self.cfg, self.state, self.run
        done = [e["action"] for e in state.nonfinite_events]
        latest, saved = None, None
        if cfg.run.on_nonfinite == "rollback":
            latest, saved = read_latest_checkpoint(run, self.process)
        if cfg.run.on_nonfinite == "skip" and done.count("skipped") < cfg.run.max_skipped_steps:
            action = "skipped"
        elif latest is not None and done.count("rolled back") < cfg.run.max_rollbacks:
            action = "rolled back"
        else:
            action = "aborted"
        event = nonfinite_event(state.step + 1, loss, cfg.run.on_nonfinite, action)
        if action == "rolled back":
            assert latest is not None
            self.roll_back(latest, saved, event)
        else:
            state.nonfinite_events.append(event)
        run.log_event(event)
        if action == "aborted":
            raise TrainingDiverged(diverged_message(run, state, loss))
        if self.process.is_main:
            logger.warning(
                "%s at step %d: %s (--on-nonfinite %s)%s",
                nonfinite_cause(loss),
                event["step"],
                action,
                cfg.run.on_nonfinite,
                f"; from step {state.step} on, the learning rate is x{self.plan.lr_scale:g}"
                if action == "rolled back"
                else "",
            )
        return action

    def roll_back(self, latest: Path, saved: SavedTraining | None, event: dict[str, Any]) -> None:
        """Reload checkpoint ``latest`` (model, optimizer, schedule, counters) and scale the
        learning rate down; the events and the time spent so far are kept."""
        state = self.state
        events, spent = [*state.nonfinite_events, event], self.spent_seconds()
        lr_scale = self.plan.lr_scale * ROLLBACK_LR_FACTOR
        if saved is not None:
            parallel.load_full_weights(self.model, saved.weights, self.process)
            self.task.load_task_state(self.trainable, saved.task)
        self.restore(latest, saved)
        state.nonfinite_events, state.train_seconds = events, spent
        self.segment_start = time.perf_counter()
        self.plan.lr_scale = lr_scale
        apply_schedule(self.scheduler)
        self.optimizer.zero_grad(set_to_none=True)
        self.logged = {}
        event.update(resumed_at=state.step, lr_scale=lr_scale)
        self.run.cut_metrics(state.step)  # the steps after the checkpoint are logged again

    def log(self, epoch: int) -> dict[str, Any]:
        """A line of metrics.jsonl from the sums since the last one; its speed is that of the
        steps since the last line too, not the run's mean (``summary.json`` has that), so a
        resumed run or a host that slows down shows its speed now."""
        now = time.perf_counter()
        seconds, self.segment_start = now - self.segment_start, now
        self.state.train_seconds += seconds
        images = self.state.train_images - self.line_images
        self.line_images = self.state.train_images
        record = log_training(
            self.run,
            self.process,
            self.state,
            self.logged,
            self.scheduler,
            epoch,
            images / max(seconds, 1e-9),
        )
        self.logged = {}
        return record

    def spent_seconds(self, this_segment: bool = True) -> float:
        """The time spent in training steps by the earlier sessions and, with
        ``this_segment``, by this one since its last log line."""
        now = time.perf_counter() if this_segment else self.segment_start
        return self.state.train_seconds + now - self.segment_start

    def out_of_time(self, this_segment: bool = True) -> bool:
        """Whether ``max_minutes`` of training steps are spent (evaluating and checkpointing
        are free); the main process's clock decides, so every rank stops after one step."""
        if not self.cfg.schedule.max_minutes:
            return False
        spent = self.spent_seconds(this_segment)
        return bool(
            distributed.broadcast_object(spent >= 60 * self.cfg.schedule.max_minutes, self.process)
        )

    def fit_to_budget(self) -> bool:
        """With ``max_minutes``, after each step: refit the schedule to the steps that fit in
        the time left at the speed measured so far (from this session's second step on), so
        the run ends at the schedule's end value; True when the time is up (the backstop, should the speed drop). The main
        process's clock decides, so every rank takes the same plan. Schedule 'bit' drops at
        fixed steps: it is not refitted, the budget only stops it."""
        cfg, state, plan = self.cfg, self.state, self.plan
        if not cfg.schedule.max_minutes:
            return False
        spent = distributed.broadcast_object(self.spent_seconds(), self.process)
        left = 60 * cfg.schedule.max_minutes - spent
        if left <= 0:
            return True
        if self.first_step is None:
            self.first_step = (state.step, spent)
        measured = state.step - self.first_step[0]
        if cfg.schedule.name == "bit" or measured < 2:
            return False
        per_step = (spent - self.first_step[1]) / measured
        fitting = min(plan.configured_steps, state.step + max(int(left / per_step), 1))
        # Re-plan on a change of more than 1% of the steps left: the measured speed wobbles.
        if abs(fitting - plan.total_steps) > max(0.01 * (plan.total_steps - state.step), 0.5):
            first = not plan.history
            warmup = round(plan.configured_warmup * fitting / plan.configured_steps)
            plan.refit(
                state.step,
                fitting,
                warmup,
                seconds_per_step=round(per_step, 6),
                reason="fitted to the time budget" if first else "speed re-measured",
            )
            if self.process.is_main and first:
                logger.info(
                    "%.3g s a step: %d steps fit in the %g-minute budget; the schedule "
                    "(warm-up %d steps) is fitted to them and refitted as the speed is "
                    "re-measured",
                    per_step,
                    fitting,
                    cfg.schedule.max_minutes,
                    plan.warmup_steps,
                )
        return False

    def checkpoint(self, is_best: bool) -> None:
        state, run = self.state, self.run
        state.wall_seconds = time.perf_counter() - self.started
        self.splits.report(run.skipped if run.writer else None, final=False)
        if not parallel.sharded(self.net):
            averaged = self.averaged
            run.save_checkpoint(
                self.model,
                self.optimizer,
                self.scheduler,
                self.saved_state(),
                is_best,
                self.task.task_state(self.trainable),
                averaged.state_dict() if averaged is not None else None,
                averaged.model if averaged and state.best_weights == "ema" else None,
            )
            return
        run.save_sharded_checkpoint(
            self.trainable,
            self.model,
            self.optimizer,
            self.scheduler,
            self.saved_state(),
            self.process,
        )
        if is_best:  # gathered whole, for everything that reads a model
            run.save_model(self.model, run.best, parallel.full_weights(self.model))

    def saved_state(self) -> dict[str, Any]:
        """The counters a checkpoint saves, with fp16's gradient scaler (``restore``)."""
        scaler = {"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
        return dataclasses.asdict(self.state) | scaler

    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint; write and return the summary."""
        cfg, process, run, model, state = self.cfg, self.process, self.run, self.model, self.state
        if parallel.sharded(self.net):  # the final model, whole, beside the sharded last.dcp
            run.save_model(model, run.last, parallel.full_weights(model))
        best = run.load_weights(run.best) if process.is_main else None
        parallel.load_full_weights(model, best, process)
        # A task's own parameters (a prediction head) as they were at the best checkpoint; a
        # sharded run's best.safetensors holds the model alone, and its task state stays.
        best_task = distributed.broadcast_object(
            run.load_task_tensors(run.best) if process.is_main else None, process
        )
        if best_task and not parallel.sharded(self.net):
            self.task.load_task_state(self.trainable, best_task)
        with parallel.whole(self.trainable):
            test = self.task.evaluate_test(model, self.splits.test, process)
        epochs_done = round(state.step / self.steps_per_epoch, 3)
        summary = dict(
            self.task.summary(test, state.best_value),
            best_epoch=state.best_epoch or epochs_done,
            best_step=state.best_step or state.step,
            epochs=epochs_done,
            steps=state.step,
            budget_spent=state.step < self.plan.configured_steps and not state.stopped_early,
            stopped_early=state.stopped_early,  # by --patience, after ``steps``
            ema=cfg.optim.ema,
            best_weights=state.best_weights,  # what best.safetensors holds, and the test scored
            schedule=self.plan.describe(),
            on_nonfinite=cfg.run.on_nonfinite,
            nonfinite_events=state.nonfinite_events,
            train_examples=len(self.splits.train),
            wall_seconds=time.perf_counter() - self.started,
            train_seconds=state.train_seconds,
            images_per_second=state.train_images / max(state.train_seconds, 1e-9),
            processes=process.world_size,
            parallel=cfg.run.parallel,
            device=process.device.type,
            precision=cfg.run.precision,
            task=cfg.task.name,
            model=cfg.model.name,
            init_from=cfg.model.init_from,
            data=cfg.data.source,
            run_folder=str(run.path),
            num_parameters=num_parameters(model),
            classes=self.splits.train.info.classes,
            **self.splits.report(run.skipped if run.writer else None),
        )
        run.write_json(run.summary, summary)
        run.plot_curves()
        return summary


def with_chosen_model(cfg: TrainConfig, splits: Splits, process: Process) -> TrainConfig:
    """``cfg`` with the model that fits the data (``model_choice``), said in one line."""
    choice = choose_model(cfg.data.source, splits.train)
    img_size = cfg.model.img_size or choice.img_size
    if process.is_main:
        logger.info(
            "no --model given: %s%s for %s (--model chooses another)",
            choice.model,
            f" at {img_size} px" if img_size else "",
            choice.reason,
        )
    return cfg.replace(model={"name": choice.model, "img_size": img_size})


def finetune_resolution_note(size: tuple[int, int], train: DataSource) -> str:
    """Why a fine-tuning run without --img-size runs at the checkpoint's resolution."""
    side = image_side(train)
    seen = f"the images are about {side} px" if side is not None else "the images' size unknown"
    note = (
        f"fine-tuning at the checkpoint's resolution, {size[0]}x{size[1]} px ({seen}); "
        "--img-size sets another (higher resizes the position embeddings)"
    )
    if side is not None and side >= 4 * max(size):
        note += f": at {max(size)} px most of the images' detail is lost"
    return note


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_splits(splits: Splits) -> str:
    sizes = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    return " / ".join(f"{len(s) if s is not None else 0} {name}" for name, s in sizes) + " images"


def with_batch_size(cfg: TrainConfig, train: DataSource, process: Process) -> TrainConfig:
    """``cfg`` with its batch size fixed (``OptimConfig.resolve_batch_size``), said in one
    line when the default was cut to the data."""
    batch, cut = cfg.optim.resolve_batch_size(len(train), process.world_size)
    if cut and process.is_main:
        logger.info(
            "batch size %d: the default %d is more than the %d training images "
            "(--batch-size sets another)",
            batch,
            DEFAULT_BATCH_SIZE,
            len(train),
        )
    return cfg.replace(optim={"batch_size": batch})


def check_batch_sizes(cfg: TrainConfig, train: DataSource, process: Process) -> int:
    """The micro-batch of one process, after checking that the sizes fit the data."""
    rank_batch, remainder = divmod(cfg.optim.micro_batch_size, process.world_size)
    if remainder:
        raise ValueError(
            f"batch_size {cfg.optim.batch_size} / accum_steps {cfg.optim.accum_steps} = "
            f"{cfg.optim.micro_batch_size} images per micro-batch cannot be split over "
            f"{process.world_size} processes: make it a multiple of {process.world_size}"
        )
    if len(train) < cfg.optim.global_batch_size:
        raise ValueError(
            f"batch_size {cfg.optim.global_batch_size} is larger than the {len(train)} training images: "
            "lower --batch-size"
        )
    return rank_batch


def warmup_length(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    """The warm-up in steps; one as long as the run is cut to a tenth of it, with a note,
    so a short run never fails on the default warm-up."""
    steps = cfg.schedule.warmup_steps
    if steps is None:
        steps = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    if steps < total_steps:
        return steps
    cut = total_steps // 10
    logger.warning(
        "the warm-up (%d steps) is as long as the run (%d steps): warming up for a tenth of "
        "the run instead (%d steps); set --warmup-epochs or --warmup-steps to choose",
        steps,
        total_steps,
        cut,
    )
    return cut


def clip_gradients(trainable: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm, after clipping to ``max_norm`` (0 = no clipping); over
    FSDP's shards too (the norm of the whole gradient, not of this process's part)."""
    if max_norm > 0:
        return parallel.whole_tensor(
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), max_norm)
        )
    grads = [p.grad for p in trainable.parameters() if p.grad is not None]
    return parallel.whole_tensor(torch.nn.utils.get_total_norm(grads))


def log_training(
    run: RunFolder,
    process: Process,
    state: LoopState,
    logged: dict[str, torch.Tensor],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    images_per_second: float,
) -> dict[str, Any]:
    """Average the metric sums over processes and steps since the last line; log them with
    the speed of those steps."""
    names = sorted(logged)  # none when every step since the last line was skipped (nan)
    totals: dict[str, float] = {}
    if names:  # the same on every process: they skip the same steps
        sums = distributed.all_reduce_sum(torch.stack([logged[n] for n in names]), process)
        totals = dict(zip(names, sums.tolist(), strict=True))
    count = max(totals.pop("count", 0.0), 1.0)
    record = dict(
        split="train",
        epoch=epoch + 1,
        step=state.step,
        **{name: value / count for name, value in totals.items()},
        lr=scheduler.get_last_lr()[0],
        images_per_second=images_per_second,
    )
    run.log(record)
    return record


def run_evaluators(
    evaluators: list[Evaluator],
    task: Task,
    model: PretrainedModel,
    run: RunFolder,
    process: Process,
    state: LoopState,
    steps_per_epoch: int,
    best_evaluator: str = "val",
    averaged: PretrainedModel | None = None,
    chosen: EvaluatorsConfig | None = None,
) -> bool:
    """Run and log every evaluator on ``model`` and, with --ema, on its ``averaged`` copy
    (logged as split "<name>_ema"); True if the monitored metric of ``best_evaluator``
    (``monitored_metric`` of the ``chosen`` settings) is the best so far, with
    ``state.best_weights`` saying which weights scored it (the average on a tie). Counts the
    evaluations without improvement for --patience."""
    chosen = chosen or EvaluatorsConfig(best=best_evaluator)
    models = {"raw": model} if averaged is None else {"raw": model, "ema": averaged}
    is_best = False
    for evaluator in evaluators:
        picks = evaluator.name == best_evaluator
        metric, mode = monitored_metric(evaluator, task, chosen) if picks else ("", "max")
        scores: dict[str, float] = {}
        for weights, evaluated in models.items():
            metrics = evaluator.run(evaluated, process)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            split = evaluator.name if weights == "raw" else f"{evaluator.name}_{weights}"
            run.log(
                dict(split=split, epoch=state.step / steps_per_epoch, step=state.step, **scalars)
            )
            if picks:
                if metric not in scalars:
                    raise ValueError(
                        f"--monitor {metric}: the {evaluator.name} evaluator gives "
                        f"{sorted(scalars)}"
                    )
                scores[weights] = float(scalars[metric])
        if not picks:
            continue
        weights = (
            "ema" if "ema" in scores and not improves(scores["raw"], scores["ema"], mode) else "raw"
        )
        value, best = scores[weights], state.best_value
        if best is None or improves(value, best, mode):
            state.best_value, state.best_step = value, state.step
            state.best_epoch = round(state.step / steps_per_epoch, 3)
            state.best_weights, state.evals_without_improvement = weights, 0
            is_best = True
        else:
            state.evals_without_improvement += 1
        if process.is_main:
            logger.info(
                "step %d (epoch %.3g): %s %s %.4f%s (best %.4f, step %d)",
                state.step,
                state.step / steps_per_epoch,
                evaluator.name,
                metric,
                scores["raw"],
                f", of the average {scores['ema']:.4f}" if "ema" in scores else "",
                state.best_value,
                state.best_step,
            )
    return is_best


def improves(value: float, than: float, mode: str) -> bool:
    """Whether ``value`` is strictly better than ``than`` ("max": higher is better)."""
    return value > than if mode == "max" else value < than


def read_latest_checkpoint(
    run: RunFolder, process: Process
) -> tuple[Path | None, SavedTraining | None]:
    """The run's latest checkpoint and, unless it is sharded (each process reads its own
    part), its content: the main process picks and reads it (other nodes may not see its
    disk), whole, and every process gets it."""
    latest = cast(
        Path | None,
        distributed.broadcast_object(run.latest_checkpoint() if process.is_main else None, process),
    )
    if latest is None or latest.is_dir():
        return latest, None
    saved = cast(
        SavedTraining,
        distributed.broadcast_object(
            run.load_checkpoint(latest) if process.is_main else None, process
        ),
    )
    return latest, saved


def muon_stepped(
    cfg: TrainConfig, trainable: nn.Module, latest: Path | None, saved: SavedTraining | None
) -> bool:
    """Whether Muon steps the blocks' matrices: not when resuming a sharded checkpoint in
    which AdamW stepped them (an FSDP run started before Muon stepped sharded matrices),
    which goes on as it started, said in the log."""
    if cfg.optim.name != "muon" or latest is None or saved is not None:
        return True
    matrices = {f"state.{name}" for name in muon_parameter_names(trainable)}
    if not matrices:  # a model without blocks: AdamW steps everything either way
        return True
    adamw = {key.split(".exp_avg")[0] for key in sharded.optimizer_keys(latest)}
    if not matrices & adamw:
        return True
    logger.warning(
        "%s: AdamW stepped every parameter of this run (FSDP with --optimizer muon before "
        "2026-12-04); it goes on so",
        latest,
    )
    return False


def nonfinite_event(step: int, loss: float, policy: str, action: str) -> dict[str, Any]:
    """A line of events.jsonl (and of the summary's ``nonfinite_events``)."""
    return dict(
        event="nonfinite",
        step=step,
        loss=loss if math.isfinite(loss) else str(loss),
        policy=policy,
        action=action,
    )


def nonfinite_cause(loss: float) -> str:
    """What was not finite: the loss, or (the loss finite here) the gradients, which under
    DDP carry another process's NaN."""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    return f"the gradients became non-finite (the loss here: {loss:.4g})"


def diverged_message(run: RunFolder, state: LoopState, loss: float) -> str:
    again = (
        "start again with a lower --lr, a longer --warmup-epochs or gradient clipping "
        "(--grad-clip 1)"
    )
    latest = run.latest_checkpoint()
    if latest is None:
        return f"{nonfinite_cause(loss)} at step {state.step + 1}, before the first checkpoint: {again}"
    saved = LoopState.from_dict(run.checkpoint_counters(latest))
    return (
        f"{nonfinite_cause(loss)} at step {state.step + 1}: training stopped; the last good "
        f"checkpoint, {latest} (step {saved.step}, epoch {saved.epoch}), is kept. Continue "
        f"from it with `vitkit train --resume {run.path} --on-nonfinite rollback` (reloads "
        f"it and halves the learning rate) or `--on-nonfinite skip`, or {again}."
    )


def interrupted_message(run: RunFolder, step: int) -> str:
    latest = run.latest_checkpoint()
    if latest is None:
        return f"interrupted at step {step}, before the first checkpoint: nothing to resume"
    return (
        f"interrupted at step {step}; the last checkpoint is {latest} (step "
        f"{run.checkpoint_counters(latest)['step']}): continue with `vitkit train --resume "
        f"{run.path}`"
    )
