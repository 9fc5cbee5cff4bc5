"""Peak memory per process of a training step: one process, DDP x2 and FSDP x2, each with and
without activation checkpointing (issue 17, item 5).

For each model and setting this starts a ``torchrun`` job (``--nproc-per-node`` 1 or 2) whose
workers build the model, spread it with ``vitkit.training.parallel.wrap`` exactly as ``vitkit
train`` does, and run ``--steps`` AdamW steps on random images (``--batch`` images per process,
fp32). Each worker reports:

- its parameter + gradient + optimizer bytes, counted from the tensors it holds (FSDP: its
  shards): 4 bytes each for the weights, the gradients and AdamW's two moments;
- its peak memory: on CPU the peak resident set size (``resource.getrusage``, which includes
  PyTorch itself), on GPU ``torch.cuda.max_memory_allocated``;
- the memory a step adds on top of what the process held before it (activations and
  gradients, mostly): on GPU the peak allocation of the timed steps minus the allocation
  before them; on Linux CPUs the peak resident size of the timed steps (``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus the resident size before them, after the memory
  freed by a first, untimed step was handed back to the system (``malloc_trim``);
- the activations: what the forward pass holds for the backward pass (the memory held
  after a forward pass minus before it), which a step's peak hides under its gradients and
  AdamW's temporaries;
- the median step time.

The table shows the worst process of each job. Goals: FSDP x2 holds at most 55% of DDP's
parameter + gradient + optimizer bytes per process; activation checkpointing cuts vit_l16's
step memory at least 3x for at most 40% more step time. The lead measures on a quiet machine;
smoke-run with a tiny model only (``--models vit_micro --img-size 32 --steps 1``).

Usage: python benchmarks/memory.py [--models vit_b16 vit_l16] [--img-size 224] [--batch 8]
       [--steps 3] [--threads N] [--device auto|cpu|cuda] [--only fsdp2-ckpt ...]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cpu_name, markdown_table

from vitkit.models import create_model
from vitkit.training import distributed, parallel
from vitkit.training.config import TrainConfig

SETTINGS = [  # (processes, parallel)
    (1, "ddp"),
    (2, "ddp"),
    (2, "fsdp"),
]


def label(processes: int, mode: str, checkpointing: bool) -> str:
    """A setting's name for ``--only``: ``single``, ``ddp2``, ``fsdp2``, with ``-ckpt``."""
    return (f"{mode}{processes}" if processes > 1 else "single") + (
        "-ckpt" if checkpointing else ""
    )


LABELS = [label(p, m, c) for p, m in SETTINGS for c in (False, True)]
MIB = 2**20


def rss_bytes() -> int:
    """The resident set size now (Linux's /proc; the peak where there is none)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def start_cpu_window() -> int:
    """Hand freed memory back (glibc keeps it, hiding what the next step allocates anew),
    reset the kernel's peak resident size and return the resident size now."""
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    return rss_bytes()


def window_peak_bytes() -> int:
    """The peak resident size since ``start_cpu_window`` (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this process holds: its shard of an FSDP ``DTensor``."""
    return tensor.to_local().numel() if hasattr(tensor, "to_local") else tensor.numel()


def worker(args: argparse.Namespace) -> None:
    """One process of a job: build, wrap, step, report to ``args.result``-RANK.json."""
    cfg = TrainConfig.from_dict(
        {
            "model": {"name": args.models[0]},
            "run": {
                "parallel": args.parallel,
                "device": args.device,
                "activation_checkpointing": args.activation_checkpointing,
            },
        }
    )
    process = distributed.start(cfg.run.device, sharded=cfg.run.parallel == "fsdp")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = process.device
        torch.manual_seed(0)
        model = create_model(cfg.model.name, img_size=args.img_size).to(device)
        net = parallel.wrap(model, cfg, process)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch, model.cfg.in_chans, args.img_size, args.img_size, device=device)
        y = torch.randint(0, model.cfg.num_classes, (args.batch,), device=device)

        def step() -> None:
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()

        step()  # allocates AdamW's moments
        cuda = device.type == "cuda"
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            before = start_cpu_window()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
        window = torch.cuda.max_memory_allocated(device) if cuda else window_peak_bytes()
        # What the forward pass holds for the backward pass (the activations), alone: a
        # step's peak also has its gradients and AdamW's temporaries, which hide the saving.
        base = torch.cuda.memory_allocated(device) if cuda else start_cpu_window()
        loss = F.cross_entropy(net(x), y)
        held = (torch.cuda.memory_allocated(device) if cuda else rss_bytes()) - base
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        state = 4 * 4 * sum(local_numel(p) for p in model.parameters())  # weights, grads, 2 moments
        result = dict(
            state=state,
            peak=peak,
            step_memory=max(window - before, 0),
            activations=max(held, 0),
            seconds=statistics.median(times),
            device=device.type,
        )
        Path(f"{args.result}-{process.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.stop(process)


def job(
    model: str,
    processes: int,
    mode: str,
    checkpointing: bool,
    args: argparse.Namespace,
    folder: Path,
) -> dict[str, float | str]:
    """One torchrun job; the worst of its processes."""
    result = folder / f"{model}-{processes}-{mode}-{int(checkpointing)}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        __file__,
        "--worker",
        "--result",
        str(result),
        "--models",
        model,
        "--parallel",
        mode,
        "--img-size",
        str(args.img_size),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ] + (["--activation-checkpointing"] if checkpointing else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-5000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{result.name}-*.json"))]
    keys = ("state", "peak", "step_memory", "activations", "seconds")
    worst = {key: max(r[key] for r in ranks) for key in keys}
    return {**worst, "device": ranks[0]["device"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="images per process")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one untimed")
    parser.add_argument("--threads", type=int, default=0, help="per process (0: vitkit's split)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SETTING",
        choices=LABELS,
        help=f"measure only these settings ({', '.join(LABELS)}); default: all",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--activation-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    rows, measured = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            for processes, mode in SETTINGS:
                for checkpointing in (False, True):
                    if args.only and label(processes, mode, checkpointing) not in args.only:
                        continue
                    r = job(model, processes, mode, checkpointing, args, Path(folder))
                    measured[model, processes, mode, checkpointing] = r
                    rows.append(
                        [
                            model,
                            f"{mode} x{processes}" if processes > 1 else "1 process",
                            "yes" if checkpointing else "no",
                            f"{r['state'] / MIB:,.0f}",
                            f"{r['peak'] / MIB:,.0f}",
                            f"{r['step_memory'] / MIB:,.0f}",
                            f"{r['activations'] / MIB:,.0f}",
                            f"{r['seconds']:.2f}",
                        ]
                    )
                    print(rows[-1], file=sys.stderr, flush=True)
    device = measured[next(iter(measured))]["device"]
    where = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    peak = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB"
    print(
        f"Training step memory per process, {args.img_size} px, batch {args.batch} per "
        f"process, fp32, AdamW; {where}; torch {torch.__version__}\n"
    )
    print(
        markdown_table(
            [
                "model",
                "processes",
                "act. ckpt",
                "param+grad+optim MiB",
                peak,
                "step adds MiB",
                "activations MiB",
                "step s",
            ],
            rows,
        )
    )
    print()
    for model in args.models:
        if args.only:  # the goals compare settings that may not all have been measured
            break
        ddp, fsdp = measured[model, 2, "ddp", False], measured[model, 2, "fsdp", False]
        plain, ckpt = measured[model, 1, "ddp", False], measured[model, 1, "ddp", True]
        print(
            f"{model}: FSDP x2 holds {fsdp['state'] / ddp['state']:.0%} of DDP x2's parameter "
            f"+ gradient + optimizer bytes (goal <= 55%); activation checkpointing holds "
            f"{plain['activations'] / max(ckpt['activations'], 1):.1f}x less activation "
            f"memory (goal >= 3x; a whole step adds "
            f"{plain['step_memory'] / max(ckpt['step_memory'], 1):.1f}x less) for "
            f"{ckpt['seconds'] / plain['seconds'] - 1:+.0%} step time (goal <= +40%)"
        )


if __name__ == "__main__":
    main()
