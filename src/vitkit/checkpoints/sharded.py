"""Sharded training checkpoints: a ``torch.distributed.checkpoint`` folder (``last.dcp/``).

An FSDP run writes one file of shards per process plus the checkpoint's ``.metadata`` (which
shard of which tensor is where), so no process ever holds the whole state, and any number of
processes can read it back: each reads what its own shards need (resharding). Beside them
``vitkit.json`` holds what is not a tensor:

    architecture, config   the model's, as in vitkit's one-file format
    model_prefix           where the model sits in the saved module ("" unless a task wraps it)
    parallel, world_size   how the run was spread when it saved (for messages)
    loop, scheduler        the training loop's counters and the learning-rate schedule

Tensors are saved as ``{"model": <the trained module's state dict>, "optimizer": <its optimizer
state dict, keyed by parameter name>}``, flattened by DCP to ``model.<name>`` and
``optimizer.state.<name>.<buffer>``. This module reads the model back without a process group
(``vitkit convert`` consolidates a sharded checkpoint into any format); the training side
(``vitkit.training.run``) writes and resumes the whole state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitkit.checkpoints.core import Checkpoint, CheckpointError, CheckpointFormat, ModelSpec
from vitkit.models.registry import get_architecture

STATE_FILE = "vitkit.json"
METADATA_FILE = ".metadata"  # written by torch.distributed.checkpoint, last of its files
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_FILE).is_file() and (path / STATE_FILE).is_file()


def read_state(path: Path) -> dict[str, Any]:
    """``vitkit.json`` of the sharded checkpoint ``path``."""
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE_FILE} is unreadable ({err})") from None


def optimizer_keys(path: Path) -> set[str]:
    """The names of the optimizer's saved tensors in the sharded checkpoint ``path``
    (``state.<parameter>.<buffer>``), read from its index alone."""
    import torch.distributed.checkpoint as dcp  # only here: seconds to import

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{OPTIMIZER_KEY}."
    return {key.removeprefix(prefix) for key in stored if key.startswith(prefix)}


def read(path: Path, spec: ModelSpec = None) -> Checkpoint:
    """The whole model of a sharded checkpoint, gathered from every shard file in this one
    process (no process group needed); the optimizer state is left on disk."""
    import torch.distributed.checkpoint as dcp  # only here: seconds to import
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = read_state(path)
    try:
        architecture = get_architecture(state["architecture"])
        config = architecture.config_class.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path / STATE_FILE}: the model's config is invalid ({err})"
        ) from None
    prefix = f"{MODEL_KEY}.{state.get('model_prefix', '')}"
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {
        key.removeprefix(prefix): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    dcp.load({f"{prefix}{k}": v for k, v in weights.items()}, checkpoint_id=str(path), no_dist=True)
    dropped = sorted(k for k in stored if not k.startswith(prefix))
    dropped += [f"{STATE_FILE} loop, scheduler"]
    return Checkpoint(config, weights, "vitkit-sharded", dropped=dropped)


FORMAT = CheckpointFormat("vitkit-sharded", detect, read)

__all__ = ["FORMAT", "METADATA_FILE", "MODEL_KEY", "OPTIMIZER_KEY", "STATE_FILE", "read_state"]
