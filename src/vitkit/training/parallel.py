"""How the trained network is spread over the processes: ``wrap`` picks DDP, FSDP or nothing.

DDP (``--parallel ddp``, the default) keeps the whole model, its gradients and its optimizer
state in every process and averages the gradients. FSDP (``--parallel fsdp``, PyTorch's FSDP2,
``fully_shard``) keeps a 1/N shard of each in each of the N processes: every unit of the model
(``PretrainedModel.units()``: the encoder blocks, the ResNet stages, a hybrid's backbone) is
gathered just before it runs and freed after, so at most one unit is whole at a time; what no
unit holds (embeddings, final norm, head, a task's own parameters) is the root's, sharded too.
The maths is DDP's: the same losses and weights to rounding (tests/test_parallel.py).

FSDP and DCP are imported only when used: they add seconds to the start of every process.

``--activation-checkpointing`` makes each unit keep only its input for the backward pass and
run its forward again there. ``--compile`` compiles the whole trained module's forward
(``torch.compile``), or each unit, for static shapes, where FSDP or activation checkpointing
works unit by unit or progressive resizing changes the input size.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from vitkit.models.pretrained import PretrainedModel
from vitkit.training import distributed
from vitkit.training.config import TrainConfig
from vitkit.training.distributed import Process
from vitkit.utils.devices import check_compiler as check_compiler  # its home was here

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

logger = logging.getLogger(__name__)


def units(module: nn.Module) -> list[nn.Module]:
    """Every unit of every vitkit model inside ``module`` (a task may wrap the model)."""
    found = [u for m in module.modules() if isinstance(m, PretrainedModel) for u in m.units()]
    if not found:
        logger.warning(
            "%s declares no units (PretrainedModel.units): FSDP shards it as one piece and "
            "activation checkpointing does nothing",
            type(module).__name__,
        )
    return found


def checkpoint_activations(unit: nn.Module) -> None:
    """Make ``unit`` recompute its forward in the backward pass instead of keeping its
    activations (non-reentrant ``torch.utils.checkpoint``; the random state is replayed, so
    dropout draws the same masks). The forward is replaced on the instance rather than the
    unit wrapped in another module: parameter names, hence checkpoints, stay the same."""
    forward = unit.forward

    @functools.wraps(forward)
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = recomputed


def compile_each_unit(pieces: list[nn.Module]) -> None:
    """Compile each unit for the static shapes it meets: a new image size, or a last smaller
    batch, compiles a graph of its own (under a minute on 2 CPU cores). Dynamo's default would
    recompile at the second size with symbolic shapes, which for a hybrid's ResNet backbone in
    fp32 ran for over 15 minutes on 2 CPU cores without finishing (docs/experiments.md, Levers
    piloted). Blocks share their code, so their graphs share one cache, and each block's own
    stochastic-depth rate is a constant of its graphs: room for 8 graphs a unit, dynamo's
    default for one, keeps the later sizes from falling back to eager."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 8 * len(pieces))
    for unit in pieces:
        unit.compile(dynamic=False)


def wrap(trainable: nn.Module, cfg: TrainConfig, process: Process) -> nn.Module:
    """What the loop calls in each step: ``trainable`` under DDP, sharded by FSDP (in place:
    the module returned is ``trainable`` itself, its parameters now sharded ``DTensor``s) or
    as it is. Build the optimizer after this: FSDP replaces the parameters."""
    per_unit = cfg.run.activation_checkpointing or cfg.run.parallel == "fsdp"
    # --compile takes the whole forward in one graph where nothing needs the units' borders
    # and the input size stays: it fuses across the borders (a block's residual add with the
    # next one's LayerNorm), a few percent faster than unit by unit (docs/experiments.md,
    # Training speed). Progressive resizing changes the size, and a new size recompiles a
    # whole graph several times slower than the units'.
    compile_units = cfg.run.compile and (per_unit or cfg.schedule.resize_start < 1.0)
    pieces = units(trainable) if per_unit or compile_units else []
    if cfg.run.activation_checkpointing:
        for unit in pieces:
            checkpoint_activations(unit)
    if cfg.run.compile:  # in place: parameter names, hence checkpoints, stay the same
        if compile_units:
            compile_each_unit(pieces or [trainable])
        else:
            trainable.compile()
    if cfg.run.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = process.mesh
        policy = MixedPrecisionPolicy()
        if cfg.run.precision == "bf16" and process.device.type == "cuda":
            # bf16 compute and all-gathers, fp32 gradient reduction and master weights.
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for unit in pieces:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(trainable, mesh=mesh, mp_policy=policy)
        return trainable
    if process.distributed:
        device_ids = [process.device] if process.device.type == "cuda" else None
        return DistributedDataParallel(trainable, device_ids=device_ids)
    return trainable


def fsdp_modules(module: nn.Module) -> list[FSDPModule]:
    """The modules of ``module`` that FSDP shards (none before FSDP was ever imported)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def sharded(net: nn.Module) -> bool:
    """Whether ``net`` (what ``wrap`` returned) is sharded by FSDP."""
    return bool(fsdp_modules(net))


def gradient_sync(net: nn.Module, sync: bool) -> Any:
    """A context for one micro-batch's backward: gradients are reduced over the processes
    only when ``sync`` (the last micro-batch of an optimizer step), else accumulated locally."""
    fsdp = fsdp_modules(net)
    if fsdp:  # the root (``net`` itself, first of its modules) sets it for every unit too
        fsdp[0].set_requires_gradient_sync(sync)
        return nullcontext()
    if isinstance(net, DistributedDataParallel) and not sync:
        return net.no_sync()
    return nullcontext()


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a plain tensor on every process: an FSDP shard (a ``DTensor``) gathered
    from all of them, a norm over the shards (a ``DTensor`` of partial sums) reduced to the
    norm of the whole; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's part of ``whole`` (which every process holds), laid out as ``param``'s
    FSDP shard, with no communication; ``whole`` itself for an unsharded ``param``."""
    if not hasattr(param, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    shard = cast(Any, param)  # a DTensor
    return distribute_tensor(whole, shard.device_mesh, shard.placements, src_data_rank=None)


@contextmanager
def whole(module: nn.Module) -> Iterator[None]:
    """Gather every FSDP shard of ``module`` for as long as the context lasts, so that each
    process may run any number of forward passes (evaluation: the processes' shares of a split
    can differ by a batch) with no collective in them. Without FSDP, nothing."""
    fsdp = fsdp_modules(module)
    for m in fsdp:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU of the main process (empty on the others),
    gathered one tensor at a time; every process must call it. Without FSDP, the state dict."""
    if not fsdp_modules(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def load_full_weights(
    model: nn.Module, weights: dict[str, torch.Tensor] | None, process: Process
) -> None:
    """Load a whole state dict that only the main process has read (other nodes may not see
    its disk) into ``model``, sharded or not, on every process."""
    if fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, cast(Any, weights if process.is_main else {}), options=options)
        return
    model.load_state_dict(distributed.broadcast_object(weights, process))  # type: ignore[arg-type]


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, trainable: nn.Module, state: dict[str, Any]
) -> None:
    """Load ``optimizer.state_dict()`` of a whole model (last.safetensors of a DDP run or a
    single process: buffers keyed by parameter index) into ``optimizer``, which may step
    FSDP's shards: then each process keeps its own part of every buffer."""
    if not sharded(trainable):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = {p: n for n, p in trainable.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[int(i)]: buffers for i, buffers in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(trainable, optimizer, cast(Any, by_name), options=options)
