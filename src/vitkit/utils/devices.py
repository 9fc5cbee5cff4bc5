"""Which device to run on, as the ``--device`` flag of every command says it."""

from __future__ import annotations

import torch


def choose_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (refused with a clear error when no GPU is visible) or ``"auto"``
    (this process's GPU when there is one, else the CPU)."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no GPU is visible: use --device cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)
