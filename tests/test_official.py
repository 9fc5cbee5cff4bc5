"""The loaded official checkpoints reproduce the official JAX code's logits.

The fixtures were produced by google-research/vision_transformer's own model code (see
../shared/reference/README.md); ``vit_micro_token`` is also bundled in tests/fixtures so at
least one reference check runs everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from tests.conftest import BUNDLED_REFERENCE, reference_dir

NAMES = ["vit_micro_token", "vit_micro_gap_prelogits", "hybrid_micro"]


def fixture_dir(name: str) -> Path:
    shared = reference_dir()
    if (shared / f"{name}.npz").exists():
        return shared
    if (BUNDLED_REFERENCE / f"{name}.npz").exists():
        return BUNDLED_REFERENCE
    pytest.skip(f"official fixture {name} not found in {shared} (set VITKIT_REFERENCE)")


def load_io(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    io = np.load(fixture_dir(name) / f"{name}_io.npz")
    images = torch.from_numpy(io["images_nhwc"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
    return images, torch.from_numpy(io["logits"])


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_official_code(name: str) -> None:
    model = vitkit.load_pretrained(fixture_dir(name) / f"{name}.npz")
    images, expected = load_io(name)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_and_count_inferred_from_arrays(name: str) -> None:
    meta = json.loads((fixture_dir(name) / f"{name}.json").read_text())
    model = vitkit.load_pretrained(fixture_dir(name) / f"{name}.npz")
    cfg = model.cfg
    assert model.num_parameters() == meta["n_params"]
    assert list(cfg.img_size) == meta["img"] and list(cfg.patch_size) == meta["patch"]
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (
        meta["hidden"],
        meta["depth"],
        meta["heads"],
        meta["mlp"],
    )
    assert cfg.classifier == meta["classifier"]
    assert cfg.representation_size == meta.get("rep")
    assert (list(cfg.resnet_layers) if cfg.resnet_layers else None) == meta.get("resnet")
    assert (cfg.gelu, cfg.eps) == ("tanh", 1e-6)


def test_exact_gelu_is_measurably_different() -> None:
    """The tanh GELU matters: the exact form misses the official logits by ~1e-4."""
    name = "vit_micro_token"
    model = vitkit.load_pretrained(fixture_dir(name) / f"{name}.npz", gelu="none")
    images, expected = load_io(name)
    with torch.no_grad():
        err = (model(images) - expected).abs().max().item()
    assert 1e-5 < err < 1e-3


def test_new_resolution_and_head() -> None:
    """img_size= resizes the grid like scipy.ndimage.zoom(order=1); num_classes= zero head."""
    name = "vit_micro_token"
    path = fixture_dir(name) / f"{name}.npz"
    original = np.load(path)["Transformer/posembed_input/pos_embedding"][0]
    model = vitkit.load_pretrained(path, img_size=48, num_classes=3)
    assert model.cfg.grid == (12, 12)
    posemb = model.pos_embed.weight.detach()[0].numpy()
    np.testing.assert_array_equal(posemb[0], original[0])  # the [class] slot is kept
    expected = bilinear_align_corners(original[1:].reshape(8, 8, -1), 12, 12)
    np.testing.assert_allclose(posemb[1:].reshape(12, 12, -1), expected, atol=1e-6)
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 3) and torch.count_nonzero(out) == 0


def bilinear_align_corners(grid: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Independent reference: output pixel i samples input coordinate i*(old-1)/(new-1)."""
    old_h, old_w = grid.shape[:2]
    out = np.empty((new_h, new_w, grid.shape[2]), dtype=np.float64)
    for i in range(new_h):
        y = i * (old_h - 1) / (new_h - 1)
        y0 = min(int(np.floor(y)), old_h - 2)
        for j in range(new_w):
            x = j * (old_w - 1) / (new_w - 1)
            x0 = min(int(np.floor(x)), old_w - 2)
            dy, dx = y - y0, x - x0
            out[i, j] = (
                grid[y0, x0] * (1 - dy) * (1 - dx)
                + grid[y0, x0 + 1] * (1 - dy) * dx
                + grid[y0 + 1, x0] * dy * (1 - dx)
                + grid[y0 + 1, x0 + 1] * dy * dx
            )
    return out
