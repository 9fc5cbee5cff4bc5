"""The small-data ViT (``vitkit.models.small_data``): shifted patch tokenization and locality
self-attention checked against the source paper's definitions written out here element by
element, its parameter count against the closed form of ``test_registry_sweep``, and both
switched off against the plain ViT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkit
from tests.conftest import perturbed
from tests.test_registry_sweep import vit_count
from vitkit.analysis.embeddings import NotApplicable, embedding_filter_components
from vitkit.checkpoints import CheckpointError
from vitkit.checkpoints.export import export
from vitkit.models.small_data import (
    LocalitySelfAttention,
    ShiftedPatchEmbed,
    SmallDataViT,
    SmallDataViTConfig,
)
from vitkit.training.optim import muon_parameter_names

pytestmark = pytest.mark.usefixtures("one_thread")


def shifted_by_hand(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The copy whose pixel (i, j) is x's (i + dy, j + dx), zero outside x: one pixel at a time."""
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            if 0 <= i + dy < height and 0 <= j + dx < width:
                out[..., i, j] = x[..., i + dy, j + dx]
    return out


def test_shifted_patches_match_the_definition() -> None:
    """Lee et al.'s SPT: the image and its four diagonal shifts by half a patch, each patch's
    values (channel, row, column) layer-normalised and projected. Non-square patches, so the
    two axes cannot be swapped unnoticed."""
    cfg = SmallDataViTConfig(img_size=(8, 12), patch_size=(4, 6), in_chans=2, width=8, num_heads=2)
    embed = ShiftedPatchEmbed(cfg)
    with torch.no_grad():
        embed.norm.weight.normal_()
        embed.norm.bias.normal_()
    x = torch.randn(2, 2, 8, 12)
    sy, sx = 2, 3
    copies = [x] + [shifted_by_hand(x, dy, dx) for dy in (-sy, sy) for dx in (-sx, sx)]
    stacked = torch.cat(copies, dim=1)  # (2, 10, 8, 12)
    rows = []
    for b in range(2):
        for gi in range(2):
            for gj in range(2):
                patch = stacked[b, :, gi * 4 : gi * 4 + 4, gj * 6 : gj * 6 + 6]
                rows.append(patch.reshape(-1))  # channel, then row, then column
    patches = torch.stack(rows).reshape(2, 4, 10 * 4 * 6)
    normed = F.layer_norm(patches, (240,), embed.norm.weight, embed.norm.bias, eps=cfg.eps)
    expected = normed @ embed.proj.weight.T + embed.proj.bias
    tokens, grid = embed(x)
    assert grid == (2, 2)
    torch.testing.assert_close(tokens, expected)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_locality_attention_matches_the_definition(impl: str, with_bias: bool) -> None:
    """LSA: softmax over the other tokens of t_h * q k^T (+ a given bias), t_h learned per head."""
    torch.manual_seed(0)
    dim, heads, n = 12, 3, 5
    attention = LocalitySelfAttention(dim, heads, impl=impl)
    with torch.no_grad():
        attention.temperature.copy_(torch.tensor([0.3, 1.1, -0.2]))
    x = torch.randn(2, n, dim)
    bias = torch.randn(heads, n, n) if with_bias else None
    out, _ = attention(x, bias)

    attention.requires_grad_(False)
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).reshape(2, n, 3, heads, 4).unbind(2)
    expected = torch.zeros(2, n, heads, 4)
    for b in range(2):
        for h in range(heads):
            for i in range(n):
                logits = [
                    float(attention.temperature[h]) * float(q[b, i, h] @ k[b, j, h])
                    + (float(bias[h, i, j]) if bias is not None else 0.0)
                    for j in range(n)
                ]
                weights = [math.exp(value) if j != i else 0.0 for j, value in enumerate(logits)]
                total = sum(weights)
                expected[b, i, h] = sum(w / total * v[b, j, h] for j, w in enumerate(weights))
    expected = expected.reshape(2, n, dim) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_no_token_attends_to_itself_and_a_lone_token_keeps_itself() -> None:
    model = perturbed(vitkit.create_model("vit_cifar_sl", depth=2)).eval()
    probs = model.forward_intermediates(torch.randn(2, 3, 32, 32)).attentions
    assert len(probs) == 2
    for layer in probs:
        assert layer.diagonal(dim1=-2, dim2=-1).abs().max() == 0
        torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]))
    # One token (average pooling over a single patch): nothing else to attend to.
    lone = SmallDataViT(img_size=4, patch_size=4, classifier="gap", width=8, depth=1, num_heads=2)
    assert torch.isfinite(lone(torch.randn(1, 3, 4, 4))).all()


@pytest.mark.parametrize(
    ("name", "spt", "lsa", "count"),
    [
        ("vit_cifar_sl", True, True, 1_843_900),
        ("vit_cifar_spt", True, False, 1_843_882),
        ("vit_cifar_lsa", False, True, 1_806_556),
    ],
)
def test_parameter_count_is_the_plain_vits_plus_each_change(
    name: str, spt: bool, lsa: bool, count: int
) -> None:
    """vit_cifar by the closed form plus only the model's own changes, and only their modules:
    SPT widens the 4x4x3 patch kernel to the five copies and adds a layer norm over the
    5 * 3 * 16 patch values; LSA adds one temperature per head and block."""
    width, depth, heads, patch_values = 192, 6, 3, 5 * 3 * 4 * 4
    spt_extra = (patch_values - 3 * 4 * 4) * width + 2 * patch_values
    expected = vit_count(width, depth, 384, 4, img=32, classes=10)
    expected += spt * spt_extra + lsa * depth * heads
    model = vitkit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected == count
    assert isinstance(model.patch_embed, ShiftedPatchEmbed) == spt
    kinds = {type(m) for m in model.modules()}
    assert (LocalitySelfAttention in kinds) == lsa


def test_both_switched_off_is_the_plain_vit() -> None:
    plain = perturbed(vitkit.create_model("vit_cifar", depth=2)).eval()
    neither = vitkit.create_model(
        "vit_cifar_sl", depth=2, shifted_patches=False, locality_attention=False
    ).eval()
    neither.load_state_dict(plain.state_dict())  # strict: the same parameters, named alike
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(neither(x), plain(x))


def test_other_image_sizes_and_progressive_resizing_take_it() -> None:
    model = vitkit.create_model("vit_cifar_sl", depth=1, dynamic_img_size=True)
    assert model.patch_embed.reduction == (4, 4)
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)


def test_muon_steps_the_blocks_matrices_not_the_temperatures() -> None:
    model = vitkit.create_model("vit_cifar_sl", depth=1)
    matrices = muon_parameter_names(model)
    assert "blocks.0.attn.qkv.weight" in matrices
    assert "blocks.0.attn.temperature" not in matrices
    assert "patch_embed.proj.weight" not in matrices


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hybrid's patches are ResNet features"):
        SmallDataViTConfig(img_size=32, patch_size=1, resnet_layers=(2,))
    with pytest.raises(ValueError, match="shifts by half a patch"):
        SmallDataViTConfig(img_size=8, patch_size=1)
    model = vitkit.create_model("vit_cifar_sl", depth=1)
    with pytest.raises(CheckpointError, match="'vit_small_data' model: write it with --to vitkit"):
        export(model, tmp_path / "model.safetensors", "timm")
    with pytest.raises(NotApplicable, match="shifted"):
        embedding_filter_components(model)
