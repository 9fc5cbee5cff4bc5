"""BiT ResNet-v2: sizes against timm's published counts, gradients, shapes and the config."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import perturbed
from vitkit.models.resnetv2 import RESNETV2_MODELS, ResNetV2, ResNetV2Config

# timm's parameter counts of resnetv2_{50x1,101x1,50x3,101x3,152x2,152x4}_bit at 1,000 classes.
TIMM_COUNTS = {
    "resnetv2_50x1": 25_549_352,
    "resnetv2_101x1": 44_541_480,
    "resnetv2_50x3": 217_319_080,
    "resnetv2_101x3": 387_934_888,
    "resnetv2_152x2": 236_335_208,
    "resnetv2_152x4": 936_533_224,
}


def build(name: str, **overrides: object) -> ResNetV2:
    return ResNetV2(ResNetV2Config(**{**RESNETV2_MODELS[name], **overrides}))


@pytest.mark.parametrize("name", TIMM_COUNTS)
def test_parameter_counts_match_timm(name: str) -> None:
    with torch.device("meta"):
        model = build(name)
    assert model.cfg.img_size == (224, 224) and model.cfg.num_classes == 1000
    assert model.num_parameters() == TIMM_COUNTS[name]


def count_from_layer_shapes(cfg: ResNetV2Config) -> int:
    """Stem kernel; per unit three norms (2 params per channel) and three bias-free kernels
    (1x1, 3x3, 1x1), plus a 1x1 projection where width or stride changes; final norm; head."""
    k = 7 if cfg.stem == "bit" else 3
    total = k * k * cfg.in_chans * cfg.width
    c_in = cfg.width
    for s, units in enumerate(cfg.layers):
        mid = cfg.width * 2**s
        for u in range(units):
            total += 2 * c_in + c_in * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * 4 * mid
            if u == 0:  # stage 0 widens 1x -> 4x, later stages halve the resolution
                total += c_in * 4 * mid
            c_in = 4 * mid
    return total + 2 * c_in + c_in * cfg.num_classes + cfg.num_classes


@pytest.mark.parametrize("name", ["resnetv2_cifar", "resnetv2_digits", "resnetv2_50x1"])
def test_small_models_counted_from_layer_shapes(name: str) -> None:
    with torch.device("meta"):
        model = build(name)
    assert model.num_parameters() == count_from_layer_shapes(model.cfg)


TINY = dict(img_size=16, num_classes=5, layers=(1, 2), width_factor=0.5)


@pytest.mark.parametrize("stem", ["bit", "conv3x3"])
def test_every_parameter_gets_a_gradient(stem: str) -> None:
    model = perturbed(ResNetV2(ResNetV2Config(**TINY, stem=stem))).train()
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("stem", "size", "side"), [("bit", 64, 8), ("conv3x3", 16, 8)])
def test_output_shapes(stem: str, size: int, side: int) -> None:
    """BiT's stem quarters the image (conv /2, pool /2); every later stage halves it."""
    model = ResNetV2(ResNetV2Config(**{**TINY, "img_size": size}, stem=stem))
    assert size // model.cfg.reduction == side
    x = torch.randn(2, 3, size, size)
    features = model.forward_features(x)
    assert features.shape == (2, 4 * 32 * 2, side, side) == (2, model.cfg.num_features, side, side)
    assert features.min() >= 0  # after the final GroupNorm+ReLU
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    assert torch.equal(model(x), torch.zeros(2, 5))  # the head starts at zero


def test_reset_classifier() -> None:
    model = perturbed(ResNetV2(ResNetV2Config(**TINY)))
    x = torch.randn(2, 3, 16, 16)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    assert model.cfg.num_classes == 7 and torch.equal(model(x), torch.zeros(2, 7))
    model.reset_classifier(0)
    assert model.cfg.num_classes == 0 and model.head is None
    torch.testing.assert_close(model(x), pooled, rtol=0, atol=0)


def test_config_round_trip_and_errors() -> None:
    cfg = ResNetV2Config(**RESNETV2_MODELS["resnetv2_cifar"], extra={"classes": ["a", "b"]})
    assert ResNetV2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="32 groups"):
        ResNetV2Config(width_factor=0.25)
    with pytest.raises(ValueError, match="stem must be one of"):
        ResNetV2Config(stem="deep")
    with pytest.raises(ValueError, match="unknown ResNet-v2 config keys"):
        ResNetV2Config.from_dict({"width": 3})
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3"):
        ResNetV2(ResNetV2Config(**TINY))(torch.randn(1, 1, 16, 16))
