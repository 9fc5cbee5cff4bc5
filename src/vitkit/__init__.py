"""vitkit: the Vision Transformer of Dosovitskiy et al. (ICLR 2021), faithful to the official code."""

from vitkit.checkpoints import CheckpointError, from_pretrained, load_pretrained, save_pretrained
from vitkit.models import VisionTransformer, ViTConfig, create_model, list_models, model_config

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "from_pretrained",
    "list_models",
    "load_pretrained",
    "model_config",
    "save_pretrained",
]
