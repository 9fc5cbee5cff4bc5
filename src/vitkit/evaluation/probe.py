"""Linear probe and k-NN on frozen features: two more ways to say how good a representation is.

The linear probe is multinomial logistic regression fitted to convergence (not for a fixed
number of epochs, so the result depends on the features and the regularisation only): the
features are standardised with the training mean and standard deviation, and full-batch
L-BFGS with a strong-Wolfe line search minimises the mean cross-entropy plus
``weight_decay / 2 * |W|^2`` (bias not decayed) in float64. The objective is strictly convex,
so the optimum is unique and the result deterministic on a given machine.

k-NN follows the protocol of Wu et al. (2018) that DINO made the standard for
self-supervised ViTs: L2-normalised features, cosine similarity, the k nearest training
examples vote for their class, weighted by ``exp(similarity / temperature)`` ("weighted",
the default) or one vote each ("majority"). Ties go to the smaller class index, as
scikit-learn's ``KNeighborsClassifier`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vitkit.evaluation.fewshot import ArrayLike, as_features, as_labels, infer_num_classes
from vitkit.models.pretrained import PretrainedModel
from vitkit.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

KnnVote = Literal["weighted", "majority"]
KNN_VOTES = ("weighted", "majority")


@dataclass
class ProbeResult:
    accuracy: float  # on the test features
    train_accuracy: float | None = None  # the linear probe's fit (None for k-NN)
    iterations: int = 0  # L-BFGS iterations (0 for k-NN)
    converged: bool = True  # the gradient's largest entry fell below the tolerance


def _checked(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_train = as_features(train_features, "train_features")
    x_test = as_features(test_features, "test_features")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("a probe needs at least one training and one test example")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension: {x_train.shape[1]} vs {x_test.shape[1]}"
        )
    y_train = as_labels(train_labels, len(x_train), "train_labels")
    y_test = as_labels(test_labels, len(x_test), "test_labels")
    return x_train, y_train, x_test, y_test


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    weight_decay: float = 1e-4,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
) -> ProbeResult:
    """Logistic regression on the features to convergence; see the module docstring.

    ``weight_decay`` is not tuned here: features are standardised, so one value is a fair
    comparison between representations; sweep it for a best-possible number.
    """
    args = (train_features, train_labels, test_features, test_labels)
    return linear_probe_head(*args, weight_decay, max_iter, tolerance)[0]


def linear_probe_head(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    weight_decay: float = 1e-4,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
) -> tuple[ProbeResult, torch.Tensor, torch.Tensor]:
    """``linear_probe``, and the fitted classifier as a linear layer on the raw features:
    weight (D, classes) and bias (classes,), the standardisation folded in."""
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(
            f"weight_decay must be >= 0 and max_iter >= 1, got {weight_decay} and {max_iter}"
        )
    x_train, y_train, x_test, y_test = _checked(
        train_features, train_labels, test_features, test_labels
    )
    classes = infer_num_classes(y_train, y_test)
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, correction=0, keepdim=True) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    weight = torch.zeros(x_train.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=0.0,  # stop on the gradient only: "to convergence"
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train)
        loss = loss + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    objective()
    gradient = max(float(p.grad.abs().max()) for p in (weight, bias) if p.grad is not None)
    iterations = int(optimizer.state[weight]["n_iter"])
    converged = gradient <= tolerance
    if not converged:
        logger.warning(
            "the linear probe did not converge in %d L-BFGS iterations (largest gradient "
            "entry %.2e > %.0e); raise max_iter or weight_decay",
            iterations,
            gradient,
            tolerance,
        )
    with torch.no_grad():
        train_accuracy = ((x_train @ weight + bias).argmax(1) == y_train).double().mean()
        accuracy = ((x_test @ weight + bias).argmax(1) == y_test).double().mean()
        raw_weight = weight / std.T  # ((x - mean) / std) W + b = x (W / std) + b - (mean / std) W
        raw_bias = bias - ((mean / std) @ weight).squeeze(0)
    result = ProbeResult(float(accuracy), float(train_accuracy), iterations, converged)
    return result, raw_weight, raw_bias


def with_linear_head(
    model: PretrainedModel, weight: torch.Tensor, bias: torch.Tensor, classes: list[str]
) -> PretrainedModel:
    """``model`` with a head that computes ``features @ weight + bias`` from the features
    ``frozen_features`` gives (a ViT keeps its representation layer, which they pass through),
    its class names recorded: a classifier ``predict``, ``eval`` and ``export`` take."""
    if isinstance(model, VisionTransformer):
        model.reset_classifier(len(classes), keep_representation=True)
    else:
        model.reset_classifier(len(classes))
    head = model.head
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.weight.copy_(weight.T)
        head.bias.copy_(bias)
    cfg: Any = model.cfg
    model.cfg = cfg.replace(extra={**cfg.extra, "classes": list(classes)})
    return model


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    vote: KnnVote,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class of each query row (see the module docstring); ``chunk`` query rows at a
    time, so memory stays at ``chunk * len(train_features)`` similarities."""
    train = F.normalize(train_features, dim=1)
    predictions = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start : start + chunk], dim=1)
        similarity, nearest = (query @ train.T).topk(min(k, len(train)), dim=1)
        if vote == "weighted":  # relative to the nearest, so a small temperature cannot overflow
            weights = ((similarity - similarity[:, :1]) / temperature).exp()
        else:
            weights = torch.ones_like(similarity)
        scores = torch.zeros(len(query), num_classes, dtype=weights.dtype)
        scores.scatter_add_(1, train_labels[nearest], weights)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


def knn_classifier(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    k: int = 20,
    vote: KnnVote = "weighted",
    temperature: float = 0.07,
) -> ProbeResult:
    """Test accuracy of k-NN with cosine similarity (DINO's defaults: k=20, temperature 0.07)."""
    if k < 1 or vote not in KNN_VOTES or not temperature > 0:
        raise ValueError(
            f"k must be >= 1, vote one of {KNN_VOTES} and temperature > 0; got k={k}, "
            f"vote={vote!r}, temperature={temperature}"
        )
    x_train, y_train, x_test, y_test = _checked(
        train_features, train_labels, test_features, test_labels
    )
    classes = infer_num_classes(y_train, y_test)
    predicted = knn_predict(x_train, y_train, x_test, k, vote, temperature, classes)
    return ProbeResult(float((predicted == y_test).double().mean()))
