"""Inference and evaluation of a trained model: the one evaluation input path, ``evaluate``
and ``predict`` (``inference``); the images a checkpoint may be scored on (``splits``); its
frozen features (``features``) and what is fitted on them: few-shot ridge regression (the
paper's and big_vision's), linear probe and k-NN.

Layer 3: may import ``vitkit.models``, ``vitkit.data``, ``vitkit.checkpoints`` and ``vitkit.utils``
only, so the training loop (its evaluators), deployment, the experiments and the CLI all use it.
"""

from vitkit.evaluation.features import extract_features
from vitkit.evaluation.fewshot import (
    fewshot_head,
    fewshot_indices,
    fewshot_lsr,
    fewshot_protocol,
    ridge_weights,
)
from vitkit.evaluation.inference import Evaluation, autocast, evaluate, predict
from vitkit.evaluation.probe import ProbeResult, knn_classifier, linear_probe

__all__ = [
    "Evaluation",
    "ProbeResult",
    "autocast",
    "evaluate",
    "extract_features",
    "fewshot_head",
    "fewshot_indices",
    "fewshot_lsr",
    "fewshot_protocol",
    "knn_classifier",
    "linear_probe",
    "predict",
    "ridge_weights",
]
