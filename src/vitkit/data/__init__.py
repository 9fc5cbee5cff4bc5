"""Data: in-memory datasets, the readers behind ``load_dataset`` and batched augmentation."""

from vitkit.data.augment import AugmentConfig, BatchTransform, to_model_input
from vitkit.data.datasets import ImageDataset, iterate_batches
from vitkit.data.readers import load_dataset

__all__ = [
    "AugmentConfig",
    "BatchTransform",
    "ImageDataset",
    "iterate_batches",
    "load_dataset",
    "to_model_input",
]
