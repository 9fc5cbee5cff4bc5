"""Data: in-memory datasets, the readers behind ``load_dataset``, the evaluation input paths
(``preprocess`` for tensors, ``preprocess_file`` for files, both by the model's
``EvalPreprocessing``) and batched augmentation."""

from vitkit.data import hf_datasets  # registers the Hugging Face datasets source
from vitkit.data.augment import AugmentConfig, BatchTransform
from vitkit.data.datasets import ImageDataset, iterate_batches
from vitkit.data.images import load_image, preprocess, read_image, to_model_input
from vitkit.data.readers import load_dataset
from vitkit.data.streaming import preprocess_file, read_eval_image
from vitkit.models.preprocessing import EvalPreprocessing

__all__ = [
    "AugmentConfig",
    "BatchTransform",
    "EvalPreprocessing",
    "ImageDataset",
    "hf_datasets",
    "iterate_batches",
    "load_dataset",
    "load_image",
    "preprocess",
    "preprocess_file",
    "read_eval_image",
    "read_image",
    "to_model_input",
]
