"""The model: ViT, its layers, position embeddings, the hybrid's ResNet and the registry."""

from vitkit.models.registry import create_model, list_models, model_config
from vitkit.models.vit import Intermediates, VisionTransformer, ViTConfig, flops_per_image

__all__ = [
    "Intermediates",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "flops_per_image",
    "list_models",
    "model_config",
]
