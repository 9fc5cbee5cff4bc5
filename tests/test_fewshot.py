"""Few-shot ridge regression, linear probe, k-NN, frozen features and their commands.

The ridge solver is checked against a direct solve of the regularised normal equations, the
whole few-shot classifier against big_vision's recipe written out in numpy, and accuracies
against what must hold: 1.0 on separable data, chance (a binomial bound) on random labels.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from vitkit.cli import main
from vitkit.data import ImageDataset, to_model_input
from vitkit.evaluation import (
    extract_features,
    fewshot_indices,
    fewshot_lsr,
    fewshot_protocol,
    knn_classifier,
    linear_probe,
    ridge_weights,
)
from vitkit.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def separable(
    num_classes: int, per_class: int, dim: int, seed: int, noise_seed: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Each class a far-apart centre (drawn from ``seed``) plus small noise (from
    ``noise_seed``): linearly separable with a wide margin."""
    centres = 10.0 * np.random.default_rng(seed).standard_normal((num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    noise = np.random.default_rng(noise_seed).standard_normal((len(labels), dim))
    return centres[labels] + 0.1 * noise, labels


@pytest.mark.parametrize("num_points, dim", [(30, 12), (10, 40)], ids=["N>D", "N<D"])
def test_ridge_primal_and_dual_equal_a_direct_solve(num_points: int, dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_points, dim, generator=g, dtype=torch.float64)
    y = torch.randn(num_points, 3, generator=g, dtype=torch.float64)
    l2 = 0.7
    direct = torch.linalg.solve(x.T @ x + l2 * torch.eye(dim, dtype=x.dtype), x.T @ y)
    for form in ("primal", "dual", "auto"):
        torch.testing.assert_close(ridge_weights(x, y, l2, form), direct, rtol=1e-10, atol=1e-10)


def test_fewshot_lsr_is_big_vision_recipe() -> None:
    """Whiten with the training mean and population std + 1e-5, append 100, targets
    2*one_hot-1, ridge with l2 2^10, argmax: written out here in numpy."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 6))
    labels, test_labels = rng.integers(0, 4, 1000), rng.integers(0, 4, 300)
    x = centres[labels] + 0.7 * rng.standard_normal((1000, 6))
    x_test = centres[test_labels] + 0.7 * rng.standard_normal((300, 6))
    mean, std = x.mean(0), x.std(0) + 1e-5

    def prepare(z: np.ndarray) -> np.ndarray:
        return np.hstack([(z - mean) / std, np.full((len(z), 1), 100.0)])

    a = prepare(x)
    w = np.linalg.solve(a.T @ a + 2.0**10 * np.eye(7), a.T @ (2.0 * np.eye(4)[labels] - 1.0))
    expected = float(((prepare(x_test) @ w).argmax(1) == test_labels).mean())
    assert 0.3 < expected < 0.95  # a case where the details decide some predictions
    assert fewshot_lsr(x, labels, x_test, test_labels) == pytest.approx(expected, abs=1e-12)


def test_separable_features_give_perfect_fewshot_accuracy() -> None:
    x, y = separable(10, 30, 32, seed=0)
    x_test, y_test = separable(10, 20, 32, seed=0, noise_seed=5)
    results = fewshot_protocol(x, y, x_test, y_test, shots=(1, 5, 25), seeds=(0, 1, 2))
    assert set(results) == {1, 5, 25}
    for result in results.values():
        assert result["mean"] == 1.0 and result["std"] == 0.0 and result["per_seed"] == [1.0] * 3


def test_random_labels_give_chance_accuracy() -> None:
    # Test labels independent of everything: any classifier's accuracy is Binomial(n, 1/10)/n,
    # sd 0.0067 for n = 2000; the bound is 6 sd.
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((250, 32)), rng.integers(0, 10, 250)
    x_test, y_test = rng.standard_normal((2000, 32)), rng.integers(0, 10, 2000)
    results = fewshot_protocol(x, y, x_test, y_test, shots=(10,), seeds=(0, 1, 2))
    for accuracy in results[10]["per_seed"]:
        assert abs(accuracy - 0.1) < 0.04
    assert abs(linear_probe(x, y, x_test, y_test).accuracy - 0.1) < 0.04
    assert abs(knn_classifier(x, y, x_test, y_test).accuracy - 0.1) < 0.04


def test_fewshot_draw_is_per_class_nested_and_seeded() -> None:
    labels = np.repeat(np.arange(5), [30, 12, 40, 25, 26])
    for seed in (0, 1):
        one, five = fewshot_indices(labels, 1, seed), fewshot_indices(labels, 5, seed)
        assert np.bincount(labels[five], minlength=5).tolist() == [5] * 5
        assert set(one) <= set(five)  # big_vision takes prefixes of one permutation per class
        # The draw is numpy's default_rng(seed) permuting each class in turn.
        rng = np.random.default_rng(seed)
        first = [rng.permutation(np.flatnonzero(labels == c))[0] for c in range(5)]
        assert one.tolist() == first
    assert not np.array_equal(fewshot_indices(labels, 5, 0), fewshot_indices(labels, 5, 1))


def test_fewshot_protocol_warns_when_a_class_is_short(caplog: pytest.LogCaptureFixture) -> None:
    x, y = separable(3, 4, 8, seed=2)
    results = fewshot_protocol(x, y, x, y, shots=(10,), seeds=(0,))
    assert results[10]["mean"] == 1.0
    assert "only 4 training examples" in caplog.text


def test_bad_inputs_say_what_is_wrong() -> None:
    x, y = separable(2, 3, 4, seed=0)
    with pytest.raises(ValueError, match="one per feature row"):
        fewshot_lsr(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="differ in dimension"):
        fewshot_lsr(x, y, x[:, :2], y)
    with pytest.raises(ValueError, match="l2_reg must be > 0"):
        fewshot_lsr(x, y, x, y, l2_reg=0)


def test_linear_probe_and_knn_on_separable_features() -> None:
    x, y = separable(5, 40, 16, seed=3)
    x_test, y_test = separable(5, 40, 16, seed=3, noise_seed=4)
    probe = linear_probe(x, y, x_test, y_test)
    assert probe.accuracy == 1.0 and probe.train_accuracy == 1.0
    assert probe.converged and 0 < probe.iterations < 1000
    for vote in ("weighted", "majority"):
        assert knn_classifier(x, y, x_test, y_test, k=5, vote=vote).accuracy == 1.0


def test_knn_votes() -> None:
    # The query is at angle 0; class 1 at 10 degrees, class 2 at 15, class 0 at 20 and 25.
    angles = np.deg2rad([10.0, 20.0, 25.0, 15.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = np.array([1, 0, 0, 2])
    query = np.array([[1.0, 0.0]])

    def predicted(k: int, vote: str, temperature: float = 0.07) -> int:
        hits = [knn_classifier(x, y, query, [c], k, vote, temperature).accuracy for c in range(3)]
        assert sorted(hits) == [0.0, 0.0, 1.0]
        return hits.index(1.0)

    assert predicted(4, "majority") == 0  # two votes against one and one
    assert predicted(2, "majority") == 1  # classes 1 and 2 tie: the smaller index wins
    assert predicted(3, "majority") == 0  # a three-way tie
    assert predicted(4, "weighted", 1e-3) == 1  # a tiny temperature: the nearest decides
    assert predicted(4, "weighted", 1e3) == 0  # a huge one: nearly a majority vote


def micro(**overrides: object) -> VisionTransformer:
    base = dict(img_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64)
    return VisionTransformer(**{**base, "num_classes": 5, **overrides})


@pytest.mark.parametrize(
    "overrides, dim",
    [({}, 32), ({"classifier": "gap"}, 32), ({"representation_size": 24}, 24)],
    ids=["token", "gap", "representation"],
)
def test_extract_features_are_the_pre_logits(overrides: dict, dim: int) -> None:
    model = micro(**overrides).train()
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    features = extract_features(model, images, batch_size=3)
    assert features.shape == (7, dim) and features.dtype == torch.float32
    assert model.training  # the mode is restored
    with torch.no_grad():
        model.eval()
        tokens = model.forward_features(to_model_input(images))
        pooled = tokens[:, 0] if model.cfg.classifier == "token" else tokens.mean(1)
        if model.pre_logits is not None:
            pooled = torch.tanh(model.pre_logits(pooled))
    torch.testing.assert_close(features, pooled)
    dataset = ImageDataset(images, torch.zeros(7, dtype=torch.long), ["a"])
    torch.testing.assert_close(extract_features(model, dataset, batch_size=7), features)


def test_extract_features_keep_no_batch_of_tokens_alive() -> None:
    """The [class] token's features are a view of the batch's (B, tokens, D) tensor: kept as
    they are, they would keep every batch's tokens in memory until the end."""
    model = micro()
    forward_features = model.forward_features
    tokens: list[weakref.ref] = []

    def recorded(x: torch.Tensor) -> torch.Tensor:
        # When batch i is embedded, batch i - 2's tokens must be gone (i - 1's may still be
        # referenced by the loop's last pooled features).
        assert all(ref() is None for ref in tokens[:-1]), "an earlier batch's tokens are alive"
        out = forward_features(x)
        tokens.append(weakref.ref(out))
        return out

    model.forward_features = recorded  # type: ignore[method-assign]
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    assert extract_features(model, images, batch_size=3).shape == (12, 32)
    assert len(tokens) == 4


def test_extract_features_resize_and_match_channels() -> None:
    model = micro(in_chans=1)
    grey = extract_features(model, torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    assert grey.shape == (2, 32)


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = micro(img_size=8, patch_size=2, in_chans=1, num_classes=10)
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "digits_model")


def test_fewshot_command_json(digits_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["fewshot", str(digits_checkpoint), "--data", "digits", "--shots", "1", "5"]
    assert main([*argv, "--seeds", "2", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feature_dim"] == 32 and out["seeds"] == 2 and set(out["shots"]) == {"1", "5"}
    for result in out["shots"].values():
        assert len(result["per_seed"]) == 2
        assert all(0.0 <= a <= 1.0 for a in result["per_seed"])
        assert result["mean"] == pytest.approx(np.mean(result["per_seed"]))


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_probe_command_json(
    digits_checkpoint: Path, method: str, capsys: pytest.CaptureFixture
) -> None:
    argv = ["probe", str(digits_checkpoint), "--data", "digits", "--method", method]
    assert main([*argv, "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == method and 0.0 <= out["accuracy"] <= 1.0
    if method == "linear":
        assert out["converged"] and out["iterations"] > 0 and 0.0 <= out["train_accuracy"] <= 1.0
    else:
        assert out["k"] == 20 and out["vote"] == "weighted"
