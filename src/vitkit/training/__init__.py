"""Training, fine-tuning and masked-patch pre-training: the paper's recipes, run folders,
resume and DDP."""

# The old module first, so that the package's ``evaluate`` below is the function, also after
# someone imports the module.
from typing import Any

import vitkit.training.evaluate  # noqa: F401
from vitkit.evaluation.inference import Evaluation, evaluate, predict
from vitkit.training import (
    mpp_task,  # noqa: F401  (registers the "mpp" task)
    recipes,  # noqa: F401  (registers the "bit" preset's resolver)
)
from vitkit.training.config import (
    DEPRECATED_PRESETS,
    TrainConfig,
    deprecated_preset,
    resolve_config,
)
from vitkit.training.loop import LoopState, TrainingDiverged, TrainingInterrupted, train
from vitkit.training.run import RunFolder

__all__ = [
    "Evaluation",
    "LoopState",
    "RunFolder",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "predict",
    "resolve_config",
    "train",
]


def __getattr__(name: str) -> Any:
    """``FINETUNE_DEFAULTS`` and ``PRETRAIN_DEFAULTS`` of the previous version (deprecated:
    the presets ``finetune`` and ``pretrain``)."""
    if name in DEPRECATED_PRESETS:
        return deprecated_preset(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
