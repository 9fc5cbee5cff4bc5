"""Running under ``torchrun``: one process per device, joined in one process group.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; the
process group reads them (``env://``). gloo on CPU, NCCL on GPU. Without torchrun everything
here is a no-op and the run is a single process. How the model is spread over the processes
(DDP or FSDP) is ``parallel.py``'s business.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from vitkit.utils.devices import choose_device

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    device: torch.device
    grouped: bool = False  # in a process group (FSDP joins one even as the only process)
    owns_group: bool = False  # ``start`` created the group, so ``stop`` ends it
    mesh: DeviceMesh | None = None  # the processes as FSDP's device mesh (--parallel fsdp)

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether a launcher (torchrun) set the rendezvous that ``env://`` reads."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def restarted() -> bool:
    """Whether torchrun's agent restarted the workers after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def start(device_preference: str, sharded: bool = False) -> Process:
    """Join the process group if launched by torchrun, and pick this process's device.

    ``sharded`` (FSDP) needs the group even for one process, so it needs the launcher."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if sharded and not launched():
        raise ValueError(
            "--parallel fsdp shards the model over the processes torchrun starts: launch with "
            "`torchrun --nproc-per-node N -m vitkit train ... --parallel fsdp` (N = 1 works "
            "too), or train in this process with --parallel ddp"
        )
    if world_size == 1 and not sharded:
        return Process(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()  # else a caller's group: it ends it too
    if owns_group:
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
    if dist.get_rank() == 0 and shares_stale_store():
        logger.warning(
            "torchrun may restart these processes (--max-restarts) but shares its rendezvous "
            "store with them: restarted processes can then look up the addresses of the ones "
            "they replace and fail to connect. Launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1."
        )
    mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Process(dist.get_rank(), dist.get_world_size(), device, True, owns_group, mesh)


def shares_stale_store() -> bool:
    """Whether torchrun will restart failed processes into the store the old ones wrote
    their addresses to (torch 2.13 keeps the keys of every attempt in it; pytorch issue
    135712); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a store of its own."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return restarts > 0 and shared


def stop(process: Process) -> None:
    """End the process group ``start`` created, and with it gloo's worker threads: threads
    that outlive the group abort the process at interpreter exit ("terminate called without
    an active exception"), after all its work is done but with a failing exit status."""
    if process.mesh is not None:
        # FSDP's state holds the group in reference cycles, freed only by the collector; the
        # mesh holds it too, and DTensor's caches of sharding decisions (in C++ too) keep
        # every mesh they met alive after the model is gone (torch 2.13). Either way the
        # group would outlive ``destroy_process_group``: let go of it here.
        gc.collect()
        getattr(process.mesh, "_pg_registry", {}).clear()
    if process.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(process: Process) -> None:
    if process.grouped:
        dist.barrier()


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
