"""Where a training step's time goes in the loop: the next batch, augmentation, forward and
backward, gradient clipping, the optimizer, and what is left (logging, seeding, the schedule).

Trains RECIPE (a file of ``benchmarks/recipes/``, its data from ``$VITKIT_DATA`` as
``train_recipes.py`` reads it) for ``--steps`` optimizer steps, ``--rounds`` times in one
process, alternating a plain run with one under ``torch.profiler``: the plain runs give the
loop's own time a step (a step hook stamps the clock after each step), the profiled ones the
time in each of the loop's labelled stages (``vitkit.training.loop.STAGES``). Medians over
the steps after ``--warmup``; the profiler's own cost shows as the difference between the
two step times. The plain runs also give the system time and page faults a step (the memory
allocator's work; compare a run under ``GLIBC_TUNABLES``), and ``--no-profile`` leaves the
profiled runs out. Evaluation and checkpointing run once a run (after its last step): their
times are given per call. ``--set TABLE.KEY=VALUE`` changes the recipe (``--set
optim.name=adam``), as a pilot would.

Usage: python benchmarks/loop_breakdown.py RECIPE [--steps 40] [--warmup 5] [--rounds 2]
       [--set optim.name=adam ...] [--no-profile]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
import tomllib
from contextlib import nullcontext
from datetime import date
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name, markdown_table
from torch import nn
from torch.profiler import ProfilerActivity, profile
from train_recipes import FROM_SCRATCH, recipe_values

from vitkit.training import TrainConfig, resolve_config, train
from vitkit.training.loop import STAGES
from vitkit.utils.config import merge_tables

PER_MICRO_BATCH = ("data", "augment", "forward_backward")
PER_STEP = (*PER_MICRO_BATCH, "clip", "optimizer")
PER_RUN = ("evaluate", "checkpoint")


def parse_setting(text: str) -> dict[str, Any]:
    """``optim.name=adam`` -> ``{"optim": {"name": "adam"}}``, the value read as TOML."""
    key, sep, value = text.partition("=")
    table, dot, name = key.partition(".")
    if not (sep and dot and table and name):
        raise SystemExit(f"--set takes TABLE.KEY=VALUE (e.g. optim.name=adam), got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: a string
    return {table: {name: parsed}}


Stamp = tuple[float, float, int]  # after a step: the clock, system seconds, page faults


def run_once(
    values: dict[str, Any], presets: list[str], steps: int, profiled: bool
) -> tuple[list[Stamp], int, Any]:
    """Train for ``steps`` steps; the stamps after each step, the batch size the run took and
    the profiler (or None)."""
    stamps: list[Stamp] = []

    def stamp(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stamps.append((time.perf_counter(), usage.ru_stime, usage.ru_minflt + usage.ru_majflt))

    with tempfile.TemporaryDirectory(prefix="vitkit-loop-") as out:
        length = {"schedule": {"steps": steps, "max_minutes": 0}, "run": {"out": out}}
        cfg = resolve_config(presets, flags=merge_tables(TrainConfig, values, length))
        with profile(activities=[ProfilerActivity.CPU]) if profiled else nullcontext() as profiler:
            train(cfg, step_hooks=[stamp])
        batch = json.loads((Path(out) / "config.json").read_text())["optim"]["batch_size"]
    return stamps, batch, profiler


def stage_times(profiler: Any, warmup: int, accum_steps: int) -> dict[str, list[float]]:
    """Seconds of each call of each labelled stage, the calls of the first ``warmup`` steps
    left out."""
    names = {label: stage for stage, label in STAGES.items()}
    calls: dict[str, list[tuple[float, float]]] = {stage: [] for stage in STAGES}
    for event in profiler.events():
        if event.name in names:
            span = event.time_range
            calls[names[event.name]].append((span.start, span.elapsed_us() / 1e6))
    skipped = {
        stage: warmup * (accum_steps if stage in PER_MICRO_BATCH else 1) for stage in PER_STEP
    }
    return {
        stage: [seconds for _, seconds in sorted(found)[skipped.get(stage, 0) :]]
        for stage, found in calls.items()
    }


def per_step(stamps: list[Stamp], warmup: int, field: int = 0) -> list[float]:
    """A stamp's ``field`` (0: the clock) between consecutive steps after ``warmup``."""
    return [
        b[field] - a[field] for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=FROM_SCRATCH)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps a run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=2, help="plain and profiled runs each")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="change the recipe, e.g. optim.name=adam (the value read as TOML); repeatable",
    )
    parser.add_argument("--no-profile", action="store_true", help="the plain runs only")
    args = parser.parse_args()
    if args.steps < args.warmup + 3 or args.rounds < 1:
        raise SystemExit(f"give --rounds >= 1 and --steps >= --warmup + 3 ({args.warmup + 3})")
    values = recipe_values(args.recipe, seed=0, epochs=None)
    for setting in args.set:
        values = merge_tables(TrainConfig, values, parse_setting(setting))
    presets = values.pop("presets", [])
    cfg = resolve_config(presets, flags=values)
    accum = cfg.optim.accum_steps

    plain: list[float] = []
    system: list[float] = []
    faults: list[float] = []
    profiled: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(args.rounds):
        stamps, batch, _ = run_once(values, presets, args.steps, profiled=False)
        plain += per_step(stamps, args.warmup)
        system += per_step(stamps, args.warmup, field=1)
        faults += per_step(stamps, args.warmup, field=2)
        if args.no_profile:
            continue
        stamps, batch, profiler = run_once(values, presets, args.steps, profiled=True)
        profiled += per_step(stamps, args.warmup)
        for stage, seconds in stage_times(profiler, args.warmup, accum).items():
            stages[stage] += seconds

    settings = ", ".join(args.set) or "as written"
    print(
        f"{args.recipe} ({settings}): {cfg.model.name}, batch {batch}, {cfg.run.precision}, "
        f"optimizer {cfg.optim.name}; {cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {date.today()}; medians over {len(plain)} steps"
    )
    step = statistics.median(plain)
    print(
        f"the loop unprofiled: {1e3 * step:.1f} ms a step, {batch / step:.0f} images/s; "
        f"{1e3 * statistics.mean(system):.1f} ms of system time and "
        f"{statistics.mean(faults):.0f} page faults a step (means)"
    )
    if args.no_profile:
        return
    # a step: each micro-batch stage once per micro-batch
    median = {
        stage: statistics.median(s) * (accum if stage in PER_MICRO_BATCH else 1) if s else 0.0
        for stage, s in stages.items()
    }
    step = statistics.median(profiled)
    rows = [
        [stage, f"{1e3 * median[stage]:.1f}", f"{median[stage] / step:.0%}"] for stage in PER_STEP
    ]
    rest = step - sum(median[stage] for stage in PER_STEP)
    rows.append(["the rest (logging, seeds, schedule)", f"{1e3 * rest:.1f}", f"{rest / step:.0%}"])
    rows.append(["a step, profiled", f"{1e3 * step:.1f}", "100%"])
    print(markdown_table(["stage", "ms a step", "share"], rows))
    step_alone = median["forward_backward"] + median["optimizer"]
    print(f"forward, backward and optimizer alone (profiled): {batch / step_alone:.0f} images/s")
    for stage in PER_RUN:
        if stages[stage]:
            print(f"{stage}: {statistics.median(stages[stage]):.2f} s a call")


if __name__ == "__main__":
    main()
