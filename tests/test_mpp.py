"""Masked patch prediction: the corruption's statistics, the targets against hand-computed
values, the loss only on corrupted patches, the hybrid, and a loss that falls with training."""

from __future__ import annotations

import pytest
import torch

from vitkit.data import to_model_input
from vitkit.models.mpp import (
    CLEAN,
    MASKED,
    RANDOM,
    UNCHANGED,
    MaskedPatchPrediction,
    apply_corruption,
    corrupt_patches,
    downsized_3bit,
    draw_corruption,
    mean_colour_3bit,
    normalised_pixels,
)
from vitkit.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def micro(**overrides: object) -> VisionTransformer:
    base = dict(img_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
    return VisionTransformer(**{**base, "num_classes": 0, **overrides})


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rate, num_patches, per_image", [(0.5, 16, 8), (0.15, 64, 10)])
def test_corruption_rates(rate: float, num_patches: int, per_image: int) -> None:
    images = 4000
    kind = draw_corruption(images, num_patches, rate, seeded(0)).kind
    corrupted = kind != CLEAN
    # BERT's scheme: exactly round(rate * N) per image, at uniformly random positions.
    assert (corrupted.sum(1) == per_image).all()
    position_rate = corrupted.double().mean(0)  # sd sqrt(r(1-r)/4000) <= 0.008
    assert (position_rate - per_image / num_patches).abs().max() < 0.04
    # Of the corrupted: 80% [mask], 10% another patch, 10% unchanged (sd <= 0.0032).
    total = corrupted.sum()
    for which, expected in ((MASKED, 0.8), (RANDOM, 0.1), (UNCHANGED, 0.1)):
        assert abs(float((kind == which).sum() / total) - expected) < 0.015


def test_another_patch_is_never_itself_and_uniform_over_the_others() -> None:
    num_patches = 4
    corruption = draw_corruption(30000, num_patches, 1.0, seeded(1))
    random = corruption.kind == RANDOM
    own = torch.arange(num_patches).expand_as(corruption.source)
    assert random.sum() > 2000
    assert (corruption.source[random] != own[random]).all()
    assert (corruption.source[~random] == own[~random]).all()
    for patch in range(num_patches):  # each of the 3 others with probability 1/3
        chosen = corruption.source[random & (own == patch)]
        counts = torch.bincount(chosen, minlength=num_patches).double() / len(chosen)
        assert counts[patch] == 0
        others = torch.cat([counts[:patch], counts[patch + 1 :]])
        assert (others - 1 / 3).abs().max() < 0.05


def test_corrupt_patches_replaces_as_drawn() -> None:
    tokens = torch.randn(64, 9, 5)
    mask_token = torch.randn(5)
    out, corrupted = corrupt_patches(tokens, mask_token, 0.5, seeded(2))
    drawn = draw_corruption(64, 9, 0.5, seeded(2))  # the same draw
    assert torch.equal(corrupted, drawn.corrupted)
    for b in range(64):
        for n in range(9):
            kind = int(drawn.kind[b, n])
            expected = {
                MASKED: mask_token,
                RANDOM: tokens[b, int(drawn.source[b, n])],
            }.get(kind, tokens[b, n])
            assert torch.equal(out[b, n], expected)
    assert torch.equal(apply_corruption(tokens, mask_token, drawn), out)


def test_patch_hook_sees_patch_embeddings_before_class_token_and_positions() -> None:
    model = micro().eval()
    x = torch.randn(2, 3, 16, 16)
    seen = []

    def hook(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens)
        return tokens

    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(x, patch_hook=hook), model.forward_features(x)
        )
        assert torch.equal(seen[0], model.patch_embed(x)[0])  # (2, 16, 32), no [class] token
        zeroed = model.forward_features(x, patch_hook=torch.zeros_like)
        other = model.forward_features(torch.randn(2, 3, 16, 16), patch_hook=torch.zeros_like)
    torch.testing.assert_close(zeroed, other)  # nothing of the image gets past the hook


def test_three_bit_levels_are_the_top_three_bits_of_every_uint8_value() -> None:
    values = torch.arange(256, dtype=torch.uint8)
    grey = values.reshape(1, 1, 16, 16)
    levels = mean_colour_3bit(to_model_input(grey), 1).flatten()  # 1x1 patches: each pixel
    assert torch.equal(levels, values.long() >> 5)


def test_mean_colour_target_by_hand() -> None:
    # One 2x4 RGB image, 2x2 patches. Patch 0: R 0,10,20,30 (mean 15 -> level 0), G 200, 220,
    # 240, 255 (228.75 -> 7), B all 64 (-> 2): 0*64 + 7*8 + 2 = 58. Patch 1: R all 255 (7),
    # G 31, 32, 33, 34 (32.5 -> 1: 31.875 <= 32.5 < 63.75), B 100, 100, 90, 90 (95 -> 2):
    # 7*64 + 1*8 + 2 = 458.
    r = [[0, 10, 255, 255], [20, 30, 255, 255]]
    g = [[200, 220, 31, 32], [240, 255, 33, 34]]
    b = [[64, 64, 100, 100], [64, 64, 90, 90]]
    image = torch.tensor([r, g, b], dtype=torch.uint8)[None]
    assert mean_colour_3bit(to_model_input(image), 2).tolist() == [[58, 458]]
    # Grey: 8 classes, the level itself (mean 15 -> 0, mean 255 -> 7).
    assert mean_colour_3bit(to_model_input(image[:, :1]), 2).tolist() == [[0, 7]]


def test_downsized_target_by_hand() -> None:
    # A 4x8 image with 4x4 patches: each of the 4x4 cells is one pixel, whose class is
    # (r >> 5) * 64 + (g >> 5) * 8 + (b >> 5), cells row-major within each patch.
    image = torch.randint(0, 256, (1, 3, 4, 8), dtype=torch.uint8, generator=seeded(3))
    top = image.long() >> 5
    classes = top[0, 0] * 64 + top[0, 1] * 8 + top[0, 2]  # (4, 8)
    expected = [classes[:, :4].flatten().tolist(), classes[:, 4:].flatten().tolist()]
    assert downsized_3bit(to_model_input(image), 4).tolist() == [expected]
    # 8x8 patches: each cell is the mean of 2x2 pixels. Cell (0, 0) of a patch whose top-left
    # 2x2 pixels are 0, 64, 64, 64 in every channel: mean 48 -> level 1 -> 1*64 + 8 + 1 = 73.
    big = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    big[..., 0, 1] = big[..., 1, 0] = big[..., 1, 1] = 64
    cells = downsized_3bit(to_model_input(big), 8)
    assert cells.shape == (1, 1, 16) and cells[0, 0, 0] == 73 and (cells[0, 0, 1:] == 0).all()


def test_normalised_pixels_order_and_scale() -> None:
    images = torch.randn(2, 3, 4, 6)
    pixels = normalised_pixels(images, 2)
    assert pixels.shape == (2, 6, 12)
    # Patch 4 of image 1 is grid row 1, column 1: rows 2-3, columns 2-3, (row, col, channel).
    raw = images[1, :, 2:4, 2:4].permute(1, 2, 0).flatten()
    expected = (raw - raw.mean()) / (raw.var(correction=0) + 1e-6).sqrt()
    torch.testing.assert_close(pixels[1, 4], expected)


def test_bad_settings_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        MaskedPatchPrediction(micro(img_size=12, patch_size=2), "downsized")
    with pytest.raises(ValueError, match="rate must be in"):
        MaskedPatchPrediction(micro(), rate=0.0)
    with pytest.raises(ValueError, match="at least 2 patches"):
        draw_corruption(1, 1)


def perturbed_head(mpp: MaskedPatchPrediction) -> MaskedPatchPrediction:
    """The head starts at zero, which would hide every gradient but the head's own."""
    with torch.no_grad():
        mpp.head.weight.normal_(0, 0.1)
        mpp.mask_token.normal_(0, 0.1)
    return mpp


@pytest.mark.parametrize("target", ["mean_colour", "downsized", "pixels"])
def test_only_corrupted_patches_carry_the_loss(target: str) -> None:
    mpp = perturbed_head(MaskedPatchPrediction(micro(), target))
    captured = []

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    mpp.backbone.norm.register_forward_hook(keep)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    loss, metrics, count = mpp(images, seeded(4))
    loss.backward()
    corrupted = draw_corruption(6, 16, 0.5, seeded(4)).corrupted  # the same draw
    assert count == 6 * 8 and loss.item() == pytest.approx(metrics["loss"].item() / count)
    grad = captured[0].grad  # d loss / d final tokens, (6, 1 + 16, 32)
    assert (grad[:, 0] == 0).all()  # the [class] token
    patch_grad = grad[:, 1:].abs().sum(-1)
    assert (patch_grad[~corrupted] == 0).all() and (patch_grad[corrupted] > 0).all()
    assert mpp.mask_token.grad.abs().sum() > 0


def test_loss_is_cross_entropy_at_corrupted_positions() -> None:
    mpp = perturbed_head(MaskedPatchPrediction(micro(classifier="gap"), "mean_colour"))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    loss, metrics, count = mpp(images, seeded(5))
    drawn = draw_corruption(3, 16, 0.5, seeded(5))
    mask_token = mpp.mask_token
    with torch.no_grad():
        features = mpp.backbone.forward_features(
            images, patch_hook=lambda t: apply_corruption(t, mask_token, drawn)
        )
        logits = mpp.head(features)[drawn.corrupted]  # gap: no [class] token to skip
        targets = mean_colour_3bit(images, 4)[drawn.corrupted]
        expected = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(loss.detach(), expected)
    assert count == len(targets) == 3 * 8
    assert metrics["accuracy"] == (logits.argmax(-1) == targets).sum()


def test_hybrid_corrupts_its_one_by_one_patch_embeddings() -> None:
    # One ResNet stage: reduction 4, so 1x1 patches of the 8x8 feature map are 4x4 pixels.
    hybrid = micro(img_size=32, patch_size=1, resnet_layers=(1,), width=32, num_heads=2)
    mpp = perturbed_head(MaskedPatchPrediction(hybrid, "downsized"))
    assert mpp.patch == (4, 4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert mpp.targets(images).shape == (2, 64, 16)
    loss, metrics, count = mpp(images, seeded(6))
    assert count == 2 * 32 and torch.isfinite(loss) and 0 <= metrics["accuracy"] <= count
    loss.backward()
    assert mpp.mask_token.grad.abs().sum() > 0
    assert mpp.backbone.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_a_few_adam_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    mpp = MaskedPatchPrediction(micro(), "mean_colour")
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(mpp.parameters(), lr=2e-3)
    before = mpp(images, seeded(100))[0].item()
    for step in range(15):
        loss = mpp(images, seeded(step))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mpp(images, seeded(100))[0].item()
    assert before == pytest.approx(torch.log(torch.tensor(512.0)).item())  # the zero head
    assert after < before - 1.0
