"""Checkpoints: every format vitkit reads, behind ``load_pretrained``, and ``export``.

Formats are tried in registration order. vitkit's own comes first (every other format module
imports it): its folder also has a config.json, and its one-file shape is a ``.safetensors``
file like timm's. The others do not overlap: Hugging Face folders, official and big_vision
``.npz`` files (told apart by their module names), timm state dicts (any other
``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file).
"""

from vitkit.checkpoints import bigvision, hf, native, official, timm  # noqa: F401  (registration)
from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    load_pretrained,
    read_checkpoint,
    register_format,
)
from vitkit.checkpoints.export import EXPORT_FORMATS, export
from vitkit.checkpoints.native import from_pretrained, save_pretrained

__all__ = [
    "EXPORT_FORMATS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormat",
    "export",
    "from_pretrained",
    "load_pretrained",
    "read_checkpoint",
    "register_format",
    "save_pretrained",
]
