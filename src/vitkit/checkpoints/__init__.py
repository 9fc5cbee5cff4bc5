"""Checkpoints: every format vitkit reads, behind ``load_pretrained``."""

from vitkit.checkpoints import native, official  # noqa: F401  (each registers its format)
from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    load_pretrained,
    read_checkpoint,
    register_format,
)
from vitkit.checkpoints.native import from_pretrained, save_pretrained

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormat",
    "from_pretrained",
    "load_pretrained",
    "read_checkpoint",
    "register_format",
    "save_pretrained",
]
