"""Training and fine-tuning: the paper's recipes, run folders, resume and DDP."""

from vitkit.training.config import FINETUNE_DEFAULTS, TrainConfig
from vitkit.training.evaluate import Evaluation, evaluate, predict
from vitkit.training.loop import TrainingDiverged, train
from vitkit.training.run import RunFolder

__all__ = [
    "FINETUNE_DEFAULTS",
    "Evaluation",
    "RunFolder",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "predict",
    "train",
]
