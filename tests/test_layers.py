"""vitkit's Linear keeps its autocast weight copy between calls: same numbers as torch's autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitkit
from vitkit.models.layers import Linear

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def twins(bias: bool = True) -> tuple[Linear, nn.Linear]:
    ours = Linear(16, 24, bias=bias)
    reference = nn.Linear(16, 24, bias=bias)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def assert_same_under_autocast(ours: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode(), torch.autocast(**AUTOCAST):
        expected = reference(x)
        for _ in range(2):  # the second call reuses the cached copy
            got = ours(x)
            assert got.dtype == expected.dtype == torch.bfloat16
            assert torch.equal(got, expected)


@pytest.mark.parametrize("bias", [True, False])
def test_cached_cast_follows_every_kind_of_weight_change(bias: bool) -> None:
    ours, reference = twins(bias)
    x = torch.randn(3, 5, 16)
    assert_same_under_autocast(ours, reference, x)

    with torch.no_grad():  # in place, as an optimizer step does
        for module in (ours, reference):
            module.weight.mul_(-3.0)
    assert_same_under_autocast(ours, reference, x)

    state = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
    for module in (ours, reference):
        module.load_state_dict(state)
    assert_same_under_autocast(ours, reference, x)

    new_weight = torch.randn_like(reference.weight)
    for module in (ours, reference):  # a new tensor behind the same Parameter
        module.weight.data = new_weight.clone()
    assert_same_under_autocast(ours, reference, x)


def test_cached_cast_is_dropped_by_dtype_changes_and_not_used_when_training() -> None:
    ours, reference = twins()
    x = torch.randn(4, 16)
    assert_same_under_autocast(ours, reference, x)
    ours.double()
    reference.double()  # autocast leaves float64 alone: both compute in float64
    with torch.inference_mode(), torch.autocast(**AUTOCAST):
        assert torch.equal(ours(x.double()), reference(x.double()))
    ours.float()
    reference.float()
    with torch.autocast(**AUTOCAST):  # gradients tracked: plain autocast, and they flow
        ours(x).sum().backward()
        reference(x).sum().backward()
    assert torch.equal(ours.weight.grad, reference.weight.grad)


def test_model_under_inference_autocast_matches_torchs_autocast() -> None:
    """Inference with the cached casts equals the model run through torch's own autocast.
    One attention path for both passes: "auto" would take another one when gradients are on."""
    model = vitkit.create_model("vit_micro", num_classes=10, attn_impl="sdpa").eval()
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast(**AUTOCAST):
        expected = model(x)  # gradients tracked: every Linear takes nn.Linear's path
        with torch.inference_mode():
            got = model(x)
    assert torch.equal(got, expected.detach())
