"""Data: in-memory datasets, the readers behind ``load_dataset``, the one image-input path
(``read_image``, ``preprocess``) and batched augmentation."""

from vitkit.data.augment import AugmentConfig, BatchTransform
from vitkit.data.datasets import ImageDataset, iterate_batches
from vitkit.data.images import load_image, preprocess, read_image, to_model_input
from vitkit.data.readers import load_dataset

__all__ = [
    "AugmentConfig",
    "BatchTransform",
    "ImageDataset",
    "iterate_batches",
    "load_dataset",
    "load_image",
    "preprocess",
    "read_image",
    "to_model_input",
]
