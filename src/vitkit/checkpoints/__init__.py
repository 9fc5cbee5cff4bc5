"""Checkpoints: every format vitkit reads, behind ``load_pretrained``, and ``export``.

The formats are tried in the order of ``vitkit.checkpoints.formats.FORMATS``.
"""

from vitkit.checkpoints.core import Checkpoint, CheckpointError, CheckpointFormat, build_model
from vitkit.checkpoints.export import EXPORT_FORMATS, export
from vitkit.checkpoints.formats import FORMATS, load_pretrained, read_checkpoint
from vitkit.checkpoints.native import from_pretrained, save_pretrained

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormat",
    "build_model",
    "export",
    "from_pretrained",
    "load_pretrained",
    "read_checkpoint",
    "save_pretrained",
]
