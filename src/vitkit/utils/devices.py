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


def check_compiler(device: torch.device) -> None:
    """Raise ValueError unless ``torch.compile`` works here, tried on a one-line function: a
    missing compiler is then a clear error before the work starts (a run, an evaluation), not
    a long traceback at its first step."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4, device=device))
    except Exception as err:  # whatever the compiler stack raises: reported, not handled
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--compile: torch.compile does not work on this machine ({reason}); on CPU it "
            "needs a C++ compiler (apt install g++, or set CXX). Leave out --compile"
        ) from err
