"""The models (ViT with its hybrid), their layers, position embeddings and the registry."""

from vitkit.models import zoo  # noqa: F401  (registers the ViT architecture and named models)
from vitkit.models.registry import (
    Architecture,
    Description,
    architecture_of,
    create_model,
    flops_per_image,
    get_architecture,
    list_architectures,
    list_models,
    model_config,
    register,
    register_architecture,
    unregister_architecture,
)
from vitkit.models.vit import Intermediates, TokenHook, VisionTransformer, ViTConfig

__all__ = [
    "Architecture",
    "Description",
    "Intermediates",
    "TokenHook",
    "ViTConfig",
    "VisionTransformer",
    "architecture_of",
    "create_model",
    "flops_per_image",
    "get_architecture",
    "list_architectures",
    "list_models",
    "model_config",
    "register",
    "register_architecture",
    "unregister_architecture",
]
