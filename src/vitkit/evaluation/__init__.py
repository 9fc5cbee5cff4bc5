"""Evaluation of frozen representations: few-shot ridge regression (the paper's and
big_vision's), linear probe and k-NN, on feature arrays; and the features of a model.

Layer: imports ``vitkit.models``, ``vitkit.data`` and ``vitkit.utils`` only, so the training
loop (an evaluator) and the CLI can both use it.
"""

from vitkit.evaluation.features import extract_features
from vitkit.evaluation.fewshot import fewshot_indices, fewshot_lsr, fewshot_protocol, ridge_weights
from vitkit.evaluation.probe import ProbeResult, knn_classifier, linear_probe

__all__ = [
    "ProbeResult",
    "extract_features",
    "fewshot_indices",
    "fewshot_lsr",
    "fewshot_protocol",
    "knn_classifier",
    "linear_probe",
    "ridge_weights",
]
