"""The training loop, top to bottom: ``train(cfg)`` runs (or resumes) a run and returns its
summary. Fine-tuning is the same loop starting from a checkpoint (``cfg.init_from``).

Reproducibility: the data order depends on (seed, epoch), and every random generator the
loop uses (dropout, stochastic depth, augmentation) is re-seeded at the start of each epoch
from (seed, epoch, rank). A checkpoint taken at the end of an epoch therefore fixes
everything that follows: resuming from it gives bit-identical weights on the same hardware.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vitkit.checkpoints import load_pretrained
from vitkit.data import BatchTransform, ImageDataset, iterate_batches, load_dataset
from vitkit.models import VisionTransformer, create_model
from vitkit.training import distributed
from vitkit.training.config import TrainConfig
from vitkit.training.distributed import Process
from vitkit.training.evaluate import autocast, evaluate
from vitkit.training.optim import build_optimizer, build_schedule
from vitkit.training.run import RunFolder


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped, its last checkpoint is intact."""


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint32)[0])


HELD_OUT_TEST = 0.2


def load_data(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
    """(train, validation or None, test); validation is held out of the training split."""
    train = load_dataset(cfg.data, "train")
    test = load_dataset(cfg.data, "test")
    if torch.equal(train.labels, test.labels) and torch.equal(train.images, test.images):
        # A single-split source (a folder of class folders, one .npz of images/labels) comes
        # back whole for every split: hold out a test set instead of testing on training images.
        warnings.warn(
            f"{cfg.data} has no separate test split: holding out {HELD_OUT_TEST:.0%} of it",
            stacklevel=2,
        )
        train, test = train.split(HELD_OUT_TEST, cfg.seed)
    if train.classes != test.classes:
        raise ValueError(
            f"{cfg.data}: the train and test splits have different classes "
            f"({len(train.classes)} vs {len(test.classes)}); give both the same class folders"
        )
    if cfg.val_fraction == 0:
        return train, None, test
    train, val = train.split(cfg.val_fraction, cfg.seed)
    return train, val, test


def build_model(cfg: TrainConfig, classes: list[str], in_chans: int) -> VisionTransformer:
    """A new model (training) or the checkpoint's with a fresh zero head (fine-tuning)."""
    regularisation = dict(dropout=cfg.dropout, drop_path=cfg.drop_path)
    extra = {"classes": classes}
    if cfg.init_from is None:
        size = {"img_size": cfg.img_size} if cfg.img_size else {}
        return create_model(
            cfg.model, num_classes=len(classes), in_chans=in_chans, extra=extra,
            **size, **regularisation,
        )  # fmt: skip
    model = load_pretrained(cfg.init_from, cfg.model, img_size=cfg.img_size, **regularisation)
    model.reset_classifier(len(classes))  # the paper replaces the head even for equal counts
    model.cfg = model.cfg.replace(extra={**model.cfg.extra, **extra})
    return model


def default_out(cfg: TrainConfig) -> Path:
    name = "digits" if cfg.data == "digits" else Path(cfg.data).name
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def train(cfg: TrainConfig | None = None, resume: str | Path | None = None) -> dict[str, Any]:
    """Train (``cfg``) or continue the run in folder ``resume``; returns ``summary.json``'s
    content. Raises ValueError, before any training, for a bad config or data."""
    if resume is not None:
        if not RunFolder(resume).holds_run():
            raise ValueError(f"{resume} holds no run to resume (no config.json there)")
        cfg = TrainConfig.from_dict(json.loads(RunFolder(resume).config.read_text()))
    cfg = cfg or TrainConfig()
    process = distributed.start(cfg.device)
    try:
        if resume is not None:
            run = RunFolder(resume, process.is_main)
        else:
            out = Path(cfg.out) if cfg.out else default_out(cfg)
            # The main process looks before anyone writes and every process takes its answer:
            # a process that looked later could see the main process's first files and stop.
            occupied = out.exists() and any(out.iterdir())
            out, occupied = distributed.broadcast_object((out, occupied), process)
            run = RunFolder(out, process.is_main)
            if occupied:
                raise ValueError(
                    f"{run.path} is not empty: continue that run with --resume {run.path}, or "
                    "give another --out"
                )
            cfg = cfg.replace(out=str(run.path))
        return _train(cfg, run, process, resume is not None)
    finally:
        distributed.stop(process)


def _train(cfg: TrainConfig, run: RunFolder, process: Process, resuming: bool) -> dict[str, Any]:
    device = process.device
    # ---- data, checked before anything is trained or written
    train_set, val_set, test_set = load_data(cfg)
    rank_batch, remainder = divmod(cfg.micro_batch_size, process.world_size)
    if remainder:
        raise ValueError(
            f"batch_size {cfg.batch_size} / accum_steps {cfg.accum_steps} = "
            f"{cfg.micro_batch_size} images per micro-batch cannot be split over "
            f"{process.world_size} processes: make it a multiple of {process.world_size}"
        )
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {cfg.batch_size} is larger than the {len(train_set)} training images: "
            "lower --batch-size"
        )
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16: use --precision fp32")
    if device.type == "cuda":
        train_set, val_set, test_set = (
            ImageDataset(d.images.to(device), d.labels.to(device), d.classes) if d else None
            for d in (train_set, val_set, test_set)
        )
    classes = train_set.classes
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    # ---- model, optimizer, schedule; restored from last.safetensors when resuming
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, classes, train_set.images.shape[1]).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, warmup_steps, total_steps, cfg.schedule)
    counters = dict(
        epoch=0, step=0, best_val_accuracy=None, best_epoch=None, train_images=0,
        train_seconds=0.0, wall_seconds=0.0,
    )  # fmt: skip
    if resuming:  # the main process reads the checkpoint: other nodes may not see its disk
        loaded = distributed.broadcast_object(
            run.load_checkpoint() if process.is_main and run.last.is_file() else None, process
        )
        if loaded is not None:  # else the run was stopped before its first checkpoint
            weights, optimizer_state, state = loaded
            model.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
            scheduler.load_state_dict(state.pop("scheduler"))
            counters.update(state)
        run.cut_metrics(counters["step"])
    elif process.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_json(run.config, cfg.to_dict())
    ddp = (
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if process.distributed
        else model
    )

    # ---- the loop
    if process.is_main:
        print(
            f"training {model.num_parameters():,}-parameter {cfg.model or cfg.init_from} on "
            f"{cfg.data}: {len(train_set)} train / {len(val_set) if val_set else 0} val / "
            f"{len(test_set)} test images, {cfg.epochs} epochs of {steps_per_epoch} steps, "
            f"{process.world_size} process(es) on {device.type}; run folder {run.path}"
        )
    bar = tqdm(
        total=total_steps, initial=counters["step"], disable=not process.is_main,
        unit="step", dynamic_ncols=True,
    )  # fmt: skip
    session_start = time.perf_counter() - counters["wall_seconds"]
    logged = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
    for epoch in range(counters["epoch"], cfg.epochs):
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        epoch_seed = derived_seed(cfg.seed, epoch, process.rank)
        torch.manual_seed(epoch_seed)  # dropout and stochastic depth
        transform = BatchTransform(
            model.cfg.img_size, len(classes), cfg.augment, derived_seed(epoch_seed, 1),
            channels=model.cfg.in_chans,
        )  # fmt: skip
        batches = iterate_batches(
            train_set, rank_batch, shuffle=True,
            seed=cfg.seed, epoch=epoch, rank=process.rank, world_size=process.world_size,
            drop_last=True,
        )  # fmt: skip
        model.train()
        epoch_start = time.perf_counter()
        micro_batches = itertools.islice(batches, steps_per_epoch * cfg.accum_steps)
        for index, (images, labels) in enumerate(micro_batches):
            x, targets = transform(images, labels, train=True)
            labels = labels.to(device)
            stepping = (index + 1) % cfg.accum_steps == 0
            no_sync = ddp.no_sync() if process.distributed and not stepping else nullcontext()
            with no_sync:
                with autocast(device, cfg.precision):
                    logits = ddp(x)
                loss = F.cross_entropy(logits.float(), targets)
                (loss / cfg.accum_steps).backward()
            logged += torch.stack(
                [loss.detach().double() * len(labels), (logits.argmax(-1) == labels).sum(),
                 torch.tensor(len(labels), device=device)]
            ).double()  # fmt: skip
            if not stepping:
                continue
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(grad_norm):
                bar.close()
                raise TrainingDiverged(diverged_message(run, counters, loss.item(), epoch))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            counters["step"] += 1
            counters["train_images"] += cfg.batch_size
            bar.update()
            if counters["step"] % cfg.log_every == 0 or counters["step"] == total_steps:
                distributed.all_reduce_sum(logged, process)
                seconds = counters["train_seconds"] + time.perf_counter() - epoch_start
                record = dict(
                    split="train", epoch=epoch + 1, step=counters["step"],
                    loss=float(logged[0] / logged[2]), accuracy=float(logged[1] / logged[2]),
                    lr=scheduler.get_last_lr()[0],
                    images_per_second=counters["train_images"] / seconds,
                )  # fmt: skip
                run.log(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                    img_s=f"{record['images_per_second']:.0f}",
                )  # fmt: skip
                logged.zero_()
        counters["train_seconds"] += time.perf_counter() - epoch_start
        counters["epoch"] = epoch + 1

        # ---- end of epoch: validate, checkpoint (every epoch: nothing is lost)
        is_best = val_set is None
        if val_set is not None:
            val = evaluate(model, val_set, cfg.eval_batch_size, cfg.precision, process)
            run.log(dict(split="val", epoch=epoch + 1, step=counters["step"], loss=val.loss,
                         accuracy=val.accuracy))  # fmt: skip
            best = counters["best_val_accuracy"]
            is_best = best is None or val.accuracy > best
            if is_best:
                counters["best_val_accuracy"], counters["best_epoch"] = val.accuracy, epoch + 1
            if process.is_main:
                bar.write(
                    f"epoch {epoch + 1}: val accuracy {val.accuracy:.4f} (best "
                    f"{counters['best_val_accuracy']:.4f}, epoch {counters['best_epoch']})"
                )
        counters["wall_seconds"] = time.perf_counter() - session_start
        run.save_checkpoint(model, optimizer, scheduler, counters, is_best)
    bar.close()

    # ---- test the best checkpoint, write the summary
    best_weights = distributed.broadcast_object(
        run.load_checkpoint(run.best)[0] if process.is_main else None, process
    )
    model.load_state_dict(best_weights)
    test = evaluate(model, test_set, cfg.eval_batch_size, cfg.precision, process)
    summary = dict(
        test_accuracy=test.accuracy,
        test_loss=test.loss,
        best_val_accuracy=counters["best_val_accuracy"],
        best_epoch=counters["best_epoch"] or cfg.epochs,
        epochs=cfg.epochs,
        steps=counters["step"],
        wall_seconds=time.perf_counter() - session_start,
        train_seconds=counters["train_seconds"],
        images_per_second=counters["train_images"] / max(counters["train_seconds"], 1e-9),
        processes=process.world_size,
        device=device.type,
        precision=cfg.precision,
        model=cfg.model,
        init_from=cfg.init_from,
        data=cfg.data,
        num_parameters=model.num_parameters(),
        classes=classes,
        confusion_matrix=test.confusion.tolist(),
    )
    run.write_json(run.summary, summary)
    run.plot_curves()
    if process.is_main:
        print(
            f"test accuracy {test.accuracy:.2%} ({test.correct}/{test.count}) in "
            f"{summary['wall_seconds']:.0f} s; run folder {run.path}"
        )
    return summary


def diverged_message(run: RunFolder, counters: dict[str, Any], loss: float, epoch: int) -> str:
    kept = (
        f"the last good checkpoint, {run.last} (epoch {counters['epoch']}), is kept"
        if counters["epoch"]
        else "no epoch had finished, so there is no checkpoint"
    )
    return (
        f"the loss became {loss if not math.isfinite(loss) else 'finite but the gradients not'}"
        f" at step {counters['step'] + 1} (epoch {epoch + 1}): training stopped; {kept}. "
        "Lower --lr, lengthen --warmup-epochs or clip gradients (--grad-clip 1)."
    )
