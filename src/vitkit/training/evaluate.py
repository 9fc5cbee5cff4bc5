"""Inference moved to ``vitkit.evaluation.inference``: its names still import from here, with a
``DeprecationWarning``."""

import warnings
from typing import Any

from vitkit.evaluation import inference


def __getattr__(name: str) -> Any:
    if name.startswith("__") or not hasattr(inference, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"vitkit.training.evaluate.{name} moved to vitkit.evaluation.inference.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(inference, name)
