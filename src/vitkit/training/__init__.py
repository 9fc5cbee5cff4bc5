"""Training and fine-tuning: the paper's recipes, run folders, resume and DDP."""

from vitkit.training.config import FINETUNE_DEFAULTS, TrainConfig
from vitkit.training.evaluate import Evaluation, evaluate, predict
from vitkit.training.loop import LoopState, TrainingDiverged, TrainingInterrupted, train
from vitkit.training.run import RunFolder

__all__ = [
    "FINETUNE_DEFAULTS",
    "Evaluation",
    "LoopState",
    "RunFolder",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "predict",
    "train",
]
