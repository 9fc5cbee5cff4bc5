"""Writing vitkit's own format: safetensors weights plus the model's config as JSON.

The model layer writes it so that ``model.save_pretrained(path)`` works without importing
``vitkit.checkpoints``, which sits above the models; ``vitkit.checkpoints.native`` reads it
back and re-exports these writers. Two shapes of the same thing:

- a folder with ``config.json`` and ``model.safetensors`` (for a directory path, like
  Hugging Face's layout);
- one ``.safetensors`` file. Training checkpoints use this shape and add their training state
  as tensors under ``state/`` and as JSON in extra metadata; model loading ignores both.

Both record the architecture's registered name (``"architecture"`` in config.json, and the
metadata key ``vitkit_architecture``) beside the config (metadata key ``vitkit_config``);
files written before architectures existed lack it and are ViTs. Every file is written to a
temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import save_file
from torch import nn

from vitkit.models.registry import ArchitectureConfig, architecture_of
from vitkit.utils.files import atomic_write

CONFIG_KEY = "vitkit_config"
ARCHITECTURE_KEY = "vitkit_architecture"
STATE_PREFIX = "state/"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Atomically write tensors (made contiguous, storage not shared) and string metadata."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size)


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``model`` as a folder, or as one file when ``path`` ends in ``.safetensors``.

    ``model`` is any model of a registered architecture. ``extra_tensors`` (stored under
    ``state/``) and ``extra_metadata`` only fit the one-file shape; training checkpoints
    use them. ``weights`` replaces ``model.state_dict()`` for a model that does not hold its
    weights whole (sharded over processes by FSDP: the caller gathers them).
    """
    path = Path(path)
    architecture = architecture_of(model).name
    cfg: Any = model.cfg
    config = cfg.to_dict()
    metadata = {CONFIG_KEY: json.dumps(config, sort_keys=True), ARCHITECTURE_KEY: architecture}
    weights = dict(model.state_dict() if weights is None else weights)
    if path.suffix == ".safetensors":
        extra = {STATE_PREFIX + k: v for k, v in (extra_tensors or {}).items()}
        save_safetensors(path, {**weights, **extra}, {**metadata, **(extra_metadata or {})})
        return path
    if extra_tensors or extra_metadata:
        raise ValueError("training state can only be saved in the one-file (.safetensors) shape")
    save_safetensors(path / WEIGHTS_FILE, weights, metadata)
    text = json.dumps({"architecture": architecture, **config}, indent=2)
    atomic_write(path / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return path


class PretrainedModel(nn.Module):
    """What every vitkit model shares, whatever its architecture: ``save_pretrained`` and
    ``num_parameters``. Subclasses set ``cfg``, their registered config, and implement the
    forward and fine-tuning methods declared here."""

    cfg: ArchitectureConfig

    def save_pretrained(self, path: str | Path) -> Path:
        """Save in vitkit's own format (this module's docstring)."""
        return save_pretrained(self, path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features before pooling: tokens (B, N, D), or a feature map (B, C, H, W)."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``forward_features``' output, then the head (unless ``pre_logits``)."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised head for ``num_classes`` (0: none, ``forward`` gives
        pre-logits)."""
        raise NotImplementedError

    def units(self) -> list[nn.Module]:
        """The large repeated pieces, in forward order, that distributed training shards one
        at a time (FSDP) and activation checkpointing recomputes one at a time: each is a
        module called as a whole in ``forward``. What no unit holds belongs to the root."""
        return []


@runtime_checkable
class Resizable(Protocol):
    """A model that takes a new input size in place (a ViT resizes its position
    embeddings); other models are built at the size they are to take."""

    def set_img_size(self, img_size: int | tuple[int, int]) -> None: ...


__all__ = [
    "ARCHITECTURE_KEY",
    "CONFIG_FILE",
    "CONFIG_KEY",
    "STATE_PREFIX",
    "WEIGHTS_FILE",
    "PretrainedModel",
    "Resizable",
    "save_pretrained",
    "save_safetensors",
]
