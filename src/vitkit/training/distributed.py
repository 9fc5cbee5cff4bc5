"""Running under ``torchrun``: one process per device, DistributedDataParallel between them.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; the
process group reads them (``env://``). gloo on CPU, NCCL on GPU. Without torchrun everything
here is a no-op and the run is a single process.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no GPU is visible: use --device cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def start(device_preference: str) -> Process:
    """Join the process group if launched by torchrun, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if world_size == 1:
        return Process(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # DistributedDataParallel imports torch._dynamo on first use, and that import keeps
        # references to every process group that exists by then, so destroy_process_group
        # cannot free it: gloo's worker threads outlive it and, when they drop their last
        # tensor during interpreter shutdown, abort the process (torch 2.13: 4 runs in 140
        # of a small DDP script). Imported before the group exists, it holds none of them,
        # and ``stop`` ends those threads.
        importlib.import_module("torch._dynamo")

        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method="env://", device_id=None
        )
    if device.type == "cpu":
        # Processes on one machine share its cores: split them instead of oversubscribing.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    return Process(dist.get_rank(), dist.get_world_size(), device)


def stop(process: Process) -> None:
    if process.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, process: Process) -> torch.Tensor:
    """Sum ``tensor`` over processes (in place) and return it."""
    if process.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


T = TypeVar("T")


def broadcast_object(value: T, process: Process) -> T:
    """The main process's ``value``, on every process."""
    if not process.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
