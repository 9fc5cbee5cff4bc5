"""Training, fine-tuning and masked-patch pre-training: the paper's recipes, run folders,
resume and DDP."""

# The old module first, so that the package's ``evaluate`` below is the function, also after
# someone imports the module.
import vitkit.training.evaluate  # noqa: F401
from vitkit.evaluation.inference import Evaluation, evaluate, predict
from vitkit.training import mpp_task  # noqa: F401  (registers the "mpp" task)
from vitkit.training.config import FINETUNE_DEFAULTS, PRETRAIN_DEFAULTS, TrainConfig
from vitkit.training.loop import LoopState, TrainingDiverged, TrainingInterrupted, train
from vitkit.training.run import RunFolder

__all__ = [
    "FINETUNE_DEFAULTS",
    "PRETRAIN_DEFAULTS",
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
