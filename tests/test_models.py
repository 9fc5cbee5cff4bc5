"""The model family: hand-counted parameters, FLOPs, gradients, attention paths, resizing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vitkit
from tests.conftest import perturbed
from tests.test_official import bilinear_align_corners
from vitkit.models import VisionTransformer, ViTConfig, flops_per_image
from vitkit.models.layers import PatchDropout
from vitkit.models.posembed import POS_EMBED_KINDS


def test_cifar_hybrid_parameter_count_from_layer_shapes() -> None:
    """The small hybrid, counted by hand: ResNet stem and two bottleneck units (width 64, the
    first with a projection), then vit_cifar's encoder on 8x8 tokens of 256 channels."""
    stem = 7 * 7 * 3 * 64 + 2 * 64
    bottleneck = 9 * 64 * 64 + 64 * 256 + 2 * (64 + 64 + 256)  # 3x3, 1x1 up, three GroupNorms
    units = (64 * 64 + bottleneck + 64 * 256 + 2 * 256) + (256 * 64 + bottleneck)
    d, m = 192, 384
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    encoder = (256 * d + d) + d + 65 * d + 6 * block + 2 * d + (d * 10 + 10)
    assert vitkit.create_model("vit_cifar_hybrid").num_parameters() == stem + units + encoder


def test_gflops_match_the_closed_form() -> None:
    """ViT-B/16 forward FLOPs from the layer shapes: 2 per multiply-add."""
    cfg = vitkit.model_config("vit_b16")
    n, d, m, p = 197, 768, 3072, 16
    per_block = 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m)
    expected = 2 * 196 * (p * p * 3) * d + 12 * per_block + 2 * d * 1000
    assert flops_per_image(cfg) == pytest.approx(expected, rel=1e-6)


VARIANTS = [
    dict(classifier="token"),
    dict(classifier="gap"),
    dict(representation_size=32),
    *[dict(pos_embed=kind) for kind in POS_EMBED_KINDS],
    dict(classifier="gap", pos_embed="relative"),
    dict(drop_path=0.1, dropout=0.1, attn_dropout=0.1),
    dict(patch_dropout=0.5),
    dict(classifier="gap", patch_dropout=0.5),
]


def micro(**overrides: object) -> VisionTransformer:
    base = dict(
        img_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=5
    )
    return VisionTransformer(ViTConfig(**{**base, **overrides}))


@pytest.mark.parametrize(
    "overrides", VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())
)
def test_every_parameter_gets_a_gradient(overrides: dict) -> None:
    model = perturbed(micro(**overrides)).train()
    model(torch.randn(3, 3, 16, 16)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hybrid_every_parameter_gets_a_gradient() -> None:
    model = perturbed(
        micro(img_size=32, patch_size=1, resnet_layers=(1, 1), width=64, num_heads=2)
    ).train()
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pos_embed", ["learned", "relative"])
def test_sdpa_equals_the_attention_returning_path(pos_embed: str) -> None:
    sdpa = perturbed(micro(pos_embed=pos_embed, attn_impl="sdpa")).eval()
    eager = micro(pos_embed=pos_embed, attn_impl="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = sdpa.forward_features(x)
        inter = sdpa.forward_intermediates(x, return_blocks=True, return_attention=True)
        torch.testing.assert_close(inter.features, reference, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(eager.forward_features(x), reference, atol=1e-6, rtol=1e-5)
    assert len(inter.blocks) == len(inter.attentions) == 2
    for probs in inter.attentions:
        assert probs.shape == (2, 4, 17, 17)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17))


@pytest.mark.parametrize(
    ("precision", "grad", "uses_sdpa"),
    [("fp32", True, True), ("fp32", False, True), ("bf16", False, True), ("bf16", True, False)],
)
def test_auto_attention_avoids_sdpa_only_when_a_cpu_trains_in_bf16(
    monkeypatch: pytest.MonkeyPatch, precision: str, grad: bool, uses_sdpa: bool
) -> None:
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    model = micro(attn_impl="auto")
    x = torch.randn(2, 3, 16, 16)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", enabled=precision == "bf16"):
        model(x)
    assert bool(calls) == uses_sdpa


def test_initialisation_follows_the_official_code() -> None:
    model = vitkit.create_model("vit_s16", depth=2)
    d = model.cfg.width
    assert torch.count_nonzero(model.cls_token) == 0
    assert torch.count_nonzero(model.head.weight) + torch.count_nonzero(model.head.bias) == 0
    assert model.pos_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    block = model.blocks[0]
    bound = math.sqrt(6 / (d + d))  # xavier-uniform of each (D, D) q/k/v matrix
    assert block.attn.qkv.weight.abs().max().item() <= bound
    assert block.attn.qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert block.mlp.fc1.bias.std().item() == pytest.approx(1e-6, rel=0.2)
    fan_in = 3 * 16 * 16  # lecun-normal patch projection
    assert model.patch_embed.proj.weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)


def linear_in_position(grid: tuple[int, int], coefficients: torch.Tensor) -> torch.Tensor:
    """(gh, gw, C) values a + b*y + c*x, where (y, x) is the position scaled to [0, 1] on each
    axis and ``coefficients`` (3, C) holds a, b and c."""
    y = torch.linspace(0, 1, grid[0], dtype=torch.float64)[:, None, None]
    x = torch.linspace(0, 1, grid[1], dtype=torch.float64)[None, :, None]
    a, b, c = coefficients.double()
    return a + b * y + c * x


@pytest.mark.parametrize("pos_embed", ["learned", "learned_2d"])
def test_pos_embed_resize_keeps_a_linear_embedding_and_round_trips(pos_embed: str) -> None:
    """Bilinear interpolation with aligned corners maps corner to corner, so it reproduces a
    function linear in the scaled position exactly on any grid: resizing 4x4 -> 6x9 must give
    the same function sampled on the new grid, and resizing back the starting values."""
    model = micro(pos_embed=pos_embed)
    pe = model.pos_embed
    coefficients = torch.randn(3, 32)
    if pos_embed == "learned_2d":  # rows hold channels 0-15 (vary with y), columns 16-31 (x)
        coefficients[2, :16] = coefficients[1, 16:] = 0
    start = linear_in_position((4, 4), coefficients).float()
    with torch.no_grad():
        if pos_embed == "learned":
            pe.weight[0, 1:] = start.reshape(16, 32)
        else:
            pe.row[0], pe.col[0] = start[:, 0, :16], start[0, :, 16:]
    class_slot = pe.weight[0, 0].clone() if pos_embed == "learned" else None
    torch.testing.assert_close(pe.patch_embeddings().reshape(4, 4, 32), start, atol=0, rtol=0)

    model.set_img_size((24, 36))
    assert model.cfg.grid == pe.grid == (6, 9)
    resized = pe.patch_embeddings().detach().double().reshape(6, 9, 32)
    expected = linear_in_position((6, 9), coefficients)
    torch.testing.assert_close(resized, expected, atol=1e-5, rtol=0)
    if class_slot is not None:
        assert torch.equal(pe.weight[0, 0], class_slot)

    model.set_img_size(16)
    back = pe.patch_embeddings().detach().reshape(4, 4, 32)
    torch.testing.assert_close(back, start, atol=1e-5, rtol=0)


def test_pos_embed_resize_non_square_matches_bilinear() -> None:
    model = micro(classifier="gap")
    old = model.pos_embed.weight.detach()[0].numpy().reshape(4, 4, -1)
    model.set_img_size((24, 36))
    assert model.cfg.grid == (6, 9)
    new = model.pos_embed.weight.detach()[0].numpy().reshape(6, 9, -1)
    np.testing.assert_allclose(new, bilinear_align_corners(old, 6, 9), atol=1e-6)


@pytest.mark.parametrize("pos_embed", ["learned", "learned_2d", "sincos_2d", "relative"])
def test_dynamic_img_size_equals_a_resized_model(pos_embed: str) -> None:
    dynamic = perturbed(micro(pos_embed=pos_embed, dynamic_img_size=True)).eval()
    resized = micro(pos_embed=pos_embed)
    resized.load_state_dict(dynamic.state_dict())
    resized.set_img_size((24, 32))
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), resized.eval()(x), atol=1e-5, rtol=1e-5)


def test_fixed_size_model_rejects_other_sizes_with_advice() -> None:
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        micro()(torch.randn(1, 3, 20, 20))


def test_reset_classifier_is_zero_and_drops_representation() -> None:
    model = perturbed(micro(representation_size=16))
    model.reset_classifier(3)
    assert model.pre_logits is None and model.cfg.representation_size is None
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16))) == 0
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_patch_dropout_keeps_the_class_token_and_a_fair_subset_of_each_images_patches() -> None:
    tokens = torch.randn(2000, 1 + 16, 4)  # every token distinct
    layer = PatchDropout(0.5, num_prefix=1).train()
    torch.manual_seed(0)
    kept = layer(tokens)
    assert kept.shape == (2000, 1 + 8, 4)
    assert torch.equal(kept[:, 0], tokens[:, 0])
    # Which of its own image's patches each kept token is: exactly one, none twice.
    matches = (kept[:, 1:, None] == tokens[:, None, 1:]).all(-1)  # (image, kept, patch)
    assert (matches.sum(-1) == 1).all()
    chosen = matches.any(1)  # (image, patch)
    assert (chosen.sum(1) == 8).all()
    # Each patch is kept with probability 1/2, independently of the image: 2,000 draws put
    # its frequency within 0.5 +- 0.045 (4 standard deviations).
    assert (chosen.float().mean(0) - 0.5).abs().max() < 0.045
    assert torch.equal(layer.eval()(tokens), tokens)
    assert PatchDropout(0.99, num_prefix=0).train()(tokens).shape == (2000, 1, 4)  # at least one


def test_patch_dropout_cuts_the_training_forward_flops_to_the_closed_form() -> None:
    """micro(): 16 patches of 4x4x3, width 32, 2 blocks, MLP 64, 5 classes. Training with half
    the patches dropped runs the blocks on n = 1 + 8 tokens; inference on all 17."""
    cfg = micro(patch_dropout=0.5).cfg
    d, m = 32, 64

    def forward_flops(n: int) -> int:
        per_block = 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m)
        return 2 * 16 * (4 * 4 * 3) * d + 2 * per_block + 2 * d * 5

    assert flops_per_image(cfg) == forward_flops(17)
    assert flops_per_image(cfg, training=True) == forward_flops(9)
    assert flops_per_image(cfg.replace(patch_dropout=0.0), training=True) == forward_flops(17)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(img_size=18), "not divisible by the patch size"),
        (dict(classifier="cls"), "classifier must be"),
        (dict(pos_embed="2d"), "pos_embed must be"),
        (dict(num_heads=5), "not divisible by num_heads"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(patch_dropout=1.0), "patch_dropout must be in"),
        (dict(patch_dropout=0.5, pos_embed="relative"), "relative position embedding"),
    ],
)
def test_bad_config_is_rejected_with_a_reason(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        micro(**overrides)


def test_unknown_model_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="vit_b16"):
        vitkit.create_model("vit_b17")


def test_sincos_embedding_is_the_closed_form() -> None:
    model = micro(pos_embed="sincos_2d", classifier="gap")
    emb = model.pos_embed.patch_embeddings()  # (16, 32): [sin x, cos x, sin y, cos y]
    omega = 1.0 / 10_000 ** (np.arange(8) / 7)
    y, x = 1, 2  # the patch at row 1, column 2
    expected = np.concatenate(
        [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
    )
    np.testing.assert_allclose(emb[y * 4 + x].numpy(), expected, atol=1e-6)
