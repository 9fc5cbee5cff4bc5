"""The one image-input path: reading files (EXIF orientation, modes, errors) and the
preprocessing that ``predict``, ``eval``, ``analyze`` and the folder reader share."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.analysis.inputs import load_images
from vitkit.data import load_dataset, preprocess, read_image
from vitkit.training import predict

STORED = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8)  # 2 rows, 3 columns
# EXIF orientation 6: "the 0th row is the visual right-hand side, the 0th column the visual
# top" (a camera held turned a quarter clockwise). Upright, the stored first row runs down the
# right edge and the stored first column along the top, from right to left:
UPRIGHT = np.array([[40, 10], [50, 20], [60, 30]], dtype=np.uint8)


def save_rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(STORED).save(path, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = save_rotated(tmp_path / "rotated.png")
    with Image.open(path) as raw:
        assert np.array_equal(np.asarray(raw), STORED)  # Pillow alone does not turn it
    assert np.array_equal(read_image(path), UPRIGHT)


def test_the_folder_reader_decodes_upright_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITKIT_CACHE", "off")
    (tmp_path / "a").mkdir()
    save_rotated(tmp_path / "a" / "x.png")
    data = load_dataset(tmp_path)
    assert np.array_equal(data.images[0, 0].numpy(), UPRIGHT)


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        ("1", (4, 5)),
        ("LA", (4, 5)),
        ("I;16", (4, 5)),
        ("F", (4, 5)),
        ("RGBA", (4, 5, 3)),
        ("P", (4, 5, 3)),
        ("CMYK", (4, 5, 3)),
    ],
)
def test_any_mode_becomes_grey_or_rgb(mode: str, shape: tuple[int, ...], tmp_path: Path) -> None:
    suffix = ".tif" if mode in ("I;16", "F", "CMYK") else ".png"
    path = tmp_path / f"x{suffix}"
    Image.new(mode, (5, 4)).save(path)
    pixels = read_image(path)
    assert pixels.dtype == np.uint8 and pixels.shape == shape


def test_alpha_is_dropped_and_palette_colours_kept(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")  # fully transparent
    assert (read_image(tmp_path / "a.png") == [200, 100, 50]).all()
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 250, 10, 20])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[0].tolist() == [[0, 0, 0], [250, 10, 20]]


def test_unreadable_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"image {tmp_path} is a folder")):
        read_image(tmp_path)
    missing = re.escape(f"image {tmp_path / 'no.png'} does not exist")
    with pytest.raises(FileNotFoundError, match=missing):
        read_image(tmp_path / "no.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape("junk.png is not an image Pillow can read")):
        read_image(tmp_path / "junk.png")


def test_predict_names_a_folder_given_as_an_image(tmp_path: Path) -> None:
    # The command takes a folder for its images (tests/test_failures.py); the function,
    # given one path, says it is a folder.
    with pytest.raises(ValueError, match=re.escape(f"image {tmp_path} is a folder: give an")):
        predict(vitkit.create_model("vit_digits"), tmp_path)


def inputs_of_predict(model: torch.nn.Module, path: Path) -> torch.Tensor:
    """What ``vitkit predict`` feeds the model for ``path``."""
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        predict(model, path)
    finally:
        hook.remove()
    (x,) = seen
    return x


@pytest.mark.parametrize("name", ["vit_micro", "vit_digits"])  # RGB, and grey from an RGB file
def test_predict_and_analyze_give_the_model_the_same_inputs(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    model = vitkit.create_model(name).eval()
    from_predict = inputs_of_predict(model, tmp_path / "x.png")
    from_analyze = load_images([tmp_path / "x.png"], model.cfg).images
    assert from_predict.shape == (1, model.cfg.in_chans, *model.cfg.img_size)
    assert torch.equal(from_predict, from_analyze)


def test_preprocess_is_the_official_scaling_and_luma(tmp_path: Path) -> None:
    """At the model's size no resize happens: [-1, 1] as (x - 127.5) / 127.5, and RGB to
    grey by the ITU-R 601 weights 0.299, 0.587, 0.114."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    grey_model = vitkit.create_model("vit_digits")
    x = inputs_of_predict(grey_model, tmp_path / "x.png")
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(x[0, 0].numpy(), (luma - 127.5) / 127.5, atol=1e-5)
    batch = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).double() - 127.5) / 127.5
    assert torch.allclose(preprocess(batch, (8, 8), 3)[0].double(), expected, atol=1e-7)
