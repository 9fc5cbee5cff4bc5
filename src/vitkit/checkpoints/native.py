"""vitkit's own format: safetensors weights plus the model's config and architecture as JSON.

``vitkit.models.pretrained`` writes it (so that ``model.save_pretrained`` needs nothing from
this layer) and describes its two shapes; this module reads it back, for any registered
architecture, and re-exports the writers. A file without the architecture's name was written
before architectures existed and holds a ViT.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
    build_model,
)
from vitkit.models.pretrained import (
    ARCHITECTURE_KEY,
    CONFIG_FILE,
    CONFIG_KEY,
    STATE_PREFIX,
    WEIGHTS_FILE,
    PretrainedModel,
    save_pretrained,
    save_safetensors,
)
from vitkit.models.registry import get_architecture
from vitkit.utils.remote import resolve_checkpoint

DEFAULT_ARCHITECTURE = "vit"  # what files written before architectures were recorded hold


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


def detect(path: Path) -> bool:
    weights = _weights_file(path)
    if weights.suffix != ".safetensors" or not weights.is_file():
        return False
    try:
        return CONFIG_KEY in read_metadata(weights)
    except CheckpointError:
        return True  # a broken .safetensors file (alone or in a folder): let read() report it


def read(path: Path, spec: ModelSpec = None) -> Checkpoint:
    weights = _weights_file(path)
    metadata = read_metadata(weights)
    try:
        architecture = get_architecture(metadata.get(ARCHITECTURE_KEY, DEFAULT_ARCHITECTURE))
    except ValueError as err:
        raise CheckpointError(f"{weights}: {err}") from None
    try:
        config = architecture.config_class.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{weights}: its vitkit config is missing or invalid ({err})"
        ) from None
    tensors = load_tensors(weights)
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    dropped = sorted(k for k in tensors if k.startswith(STATE_PREFIX))
    dropped += sorted(f"metadata {k}" for k in metadata if k not in (CONFIG_KEY, ARCHITECTURE_KEY))
    return Checkpoint(config, state_dict, "vitkit", dropped=dropped)


def from_pretrained(path: str | Path) -> PretrainedModel:
    """Read back what ``save_pretrained`` wrote, bit-exactly (from a Hub repository too:
    ``hf-hub:ORG/NAME``)."""
    return build_model(read(resolve_checkpoint(path)))


FORMAT = CheckpointFormat("vitkit", detect, read)

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "STATE_PREFIX",
    "WEIGHTS_FILE",
    "from_pretrained",
    "load_tensors",
    "read",
    "read_metadata",
    "save_pretrained",
    "save_safetensors",
]
