"""Few-shot linear evaluation, as the paper (Section 4.1) and big_vision's
``evaluators/fewshot_lsr.py`` do it.

Frozen features of a few training images per class are whitened with their own mean and
population standard deviation (+1e-5, so constant features do not divide by zero), a constant
feature of 100 is appended as the bias (large, so its weight is barely regularised), and a
ridge regression onto targets ``2 * one_hot - 1`` is solved in closed form; a test image gets
the class of its largest output. Everything runs in float64 (big_vision: float32) because the
systems are small and the regularised Gram matrix of 100-valued bias columns is badly scaled.

``fewshot_protocol`` repeats it for several shot counts and seeds with big_vision's draw: for a
seed, ``numpy.random.default_rng(seed)`` permutes the indices of each class in turn (class 0
first) and an n-shot run takes the first n of each permutation, so the 1-shot set of a seed is
part of its 5-shot set. Given the training set in the same order, the images are the ones
big_vision would pick.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

BIAS_CONSTANT = 100.0
DEFAULT_L2_REG = 2.0**10
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = (0, 1, 2)

ArrayLike = torch.Tensor | np.ndarray


def as_features(features: ArrayLike, name: str = "features") -> torch.Tensor:
    """A (N, D) float64 CPU tensor, or a clear error."""
    tensor = torch.as_tensor(features).detach().cpu().to(torch.float64)
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be a (num_examples, dim) array, got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return tensor


def as_labels(labels: ArrayLike, count: int, name: str = "labels") -> torch.Tensor:
    """A (count,) int64 CPU tensor of non-negative class indices, or a clear error."""
    tensor = torch.as_tensor(labels).detach().cpu()
    if tensor.shape != (count,) or tensor.is_floating_point():
        raise ValueError(
            f"{name} must be {count} integer class indices (one per feature row), got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    tensor = tensor.long()
    if count and int(tensor.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(tensor.min())}")
    return tensor


def infer_num_classes(*labels: torch.Tensor) -> int:
    return max((int(y.max()) + 1 for y in labels if len(y)), default=0)


def ridge_weights(
    x: torch.Tensor,
    y: torch.Tensor,
    l2_reg: float,
    form: Literal["auto", "primal", "dual"] = "auto",
) -> torch.Tensor:
    """``argmin_W |x W - y|^2 + l2_reg |W|^2`` for x (N, D), y (N, C), in closed form.

    The primal form solves the (D, D) system ``(x^T x + l2 I) W = x^T y``; the dual form the
    (N, N) system ``(x x^T + l2 I) A = y`` with ``W = x^T A``. They are equal; ``"auto"``
    takes the smaller system (primal when N >= D, as big_vision). Both matrices are symmetric
    positive definite for ``l2_reg > 0``, so a Cholesky solve is exact and stable.
    """
    if not l2_reg > 0:
        raise ValueError(f"l2_reg must be > 0 for a unique ridge solution, got {l2_reg}")
    if form not in ("auto", "primal", "dual"):
        raise ValueError(f"form must be 'auto', 'primal' or 'dual', not {form!r}")
    num_points, dim = x.shape
    if form == "primal" or (form == "auto" and num_points >= dim):
        gram = x.T @ x + l2_reg * torch.eye(dim, dtype=x.dtype)
        return torch.cholesky_solve(x.T @ y, torch.linalg.cholesky(gram))
    gram = x @ x.T + l2_reg * torch.eye(num_points, dtype=x.dtype)
    return x.T @ torch.cholesky_solve(y, torch.linalg.cholesky(gram))


def fewshot_lsr(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    l2_reg: float = DEFAULT_L2_REG,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of the closed-form ridge classifier fitted on all given training rows.

    ``num_classes`` (default: the largest label seen + 1) sets the number of target columns;
    a class without training rows keeps the target -1 everywhere, as in big_vision.
    """
    x_train = as_features(train_features, "train_features")
    x_test = as_features(test_features, "test_features")
    y_train = as_labels(train_labels, len(x_train), "train_labels")
    y_test = as_labels(test_labels, len(x_test), "test_labels")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("few-shot evaluation needs at least one training and one test example")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension: {x_train.shape[1]} vs {x_test.shape[1]}"
        )
    classes = infer_num_classes(y_train, y_test) if num_classes is None else num_classes
    if classes < infer_num_classes(y_train, y_test):
        raise ValueError(
            f"labels reach {infer_num_classes(y_train, y_test) - 1} but num_classes is {classes}"
        )
    mean, std, weights = _fit(x_train, y_train, classes, l2_reg)
    predictions = (_whitened(x_test, mean, std) @ weights).argmax(dim=1)
    return float((predictions == y_test).double().mean())


def _fit(
    x_train: torch.Tensor, y_train: torch.Tensor, classes: int, l2_reg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whitening (mean, std, each (1, D)) and the ridge weights ((D + 1, C), the last row
    the bias column's) fitted on the whitened ``x_train``."""
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, correction=0, keepdim=True) + 1e-5
    targets = 2.0 * torch.nn.functional.one_hot(y_train, classes).to(torch.float64) - 1.0
    return mean, std, ridge_weights(_whitened(x_train, mean, std), targets, l2_reg)


def _whitened(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``x`` whitened, with the constant bias column appended."""
    x = (x - mean) / std
    return torch.cat([x, torch.full((len(x), 1), BIAS_CONSTANT, dtype=x.dtype)], dim=1)


def fewshot_head(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    num_classes: int,
    l2_reg: float = DEFAULT_L2_REG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier ``fewshot_lsr`` fits, as one linear layer on the raw features:
    ``features @ weight + bias`` (weight (D, C), bias (C,), float64) with the whitening and
    the bias column folded in, so that a model's head can compute it."""
    x_train = as_features(train_features, "train_features")
    y_train = as_labels(train_labels, len(x_train), "train_labels")
    if len(x_train) == 0:
        raise ValueError("fitting a few-shot head needs at least one training example")
    mean, std, weights = _fit(x_train, y_train, num_classes, l2_reg)
    weight = weights[:-1] / std.T
    return weight, BIAS_CONSTANT * weights[-1] - (mean @ weight)[0]


def fewshot_indices(
    labels: ArrayLike, shots: int, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of ``shots`` training examples per class, drawn as big_vision draws them."""
    y = as_labels(labels, len(labels)).numpy()
    classes = infer_num_classes(torch.from_numpy(y)) if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(classes)]
    return np.concatenate([indices[:shots] for indices in per_class]).astype(np.int64)


def fewshot_protocol(
    features: ArrayLike,
    labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    l2_reg: float = DEFAULT_L2_REG,
    num_classes: int | None = None,
) -> dict[int, dict[str, float | list[float]]]:
    """``{shots: {"mean", "std", "per_seed"}}``: test accuracy of ``fewshot_lsr`` on
    ``shots`` training examples per class, for each seed (see the module docstring).

    ``std`` is the population standard deviation over the seeds (numpy's default, ddof=0);
    ``per_seed`` lists the accuracies in the order of ``seeds``. A class with fewer than
    ``shots`` examples contributes all it has (as big_vision), with a warning.
    """
    x_train = as_features(features, "features")
    x_test = as_features(test_features, "test_features")
    y_train = as_labels(labels, len(x_train))
    y_test = as_labels(test_labels, len(x_test), "test_labels")
    if not shots or any(int(n) < 1 for n in shots):
        raise ValueError(f"shots must be positive counts per class, got {list(shots)}")
    if not seeds:
        raise ValueError("give at least one seed")
    classes = infer_num_classes(y_train, y_test) if num_classes is None else num_classes
    smallest = min(int((y_train == c).sum()) for c in range(classes)) if classes else 0
    results: dict[int, dict[str, float | list[float]]] = {}
    for n in shots:
        if n > smallest:
            logger.warning(
                "%d-shot: a class has only %d training examples; it contributes all of them",
                n,
                smallest,
            )
        accuracies = []
        for seed in seeds:
            chosen = torch.from_numpy(fewshot_indices(y_train, n, seed, classes))
            accuracies.append(
                fewshot_lsr(x_train[chosen], y_train[chosen], x_test, y_test, l2_reg, classes)
            )
        results[int(n)] = {
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies)),
            "per_seed": accuracies,
        }
    return results
