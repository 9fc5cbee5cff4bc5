"""``vitkit eval``'s top-5 and per-class accuracy, its JSON and its confusion-matrix PNG, checked
against the same numbers worked out by hand from a tiny model's logits."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import perturbed
from vitkit.cli import main
from vitkit.data import EvalPreprocessing, load_dataset, preprocess
from vitkit.data.base import note_stand_in
from vitkit.models.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    test_set = load_dataset("digits", "test")
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x_test=test_set.images[:80, 0].numpy(), y_test=test_set.labels[:80].numpy())
    return path


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    """A random ViT for 8x8 digits: right on some, its top 5 right on about half."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=8,
        patch_size=2,
        width=32,
        depth=1,
        num_heads=2,
        mlp_dim=64,
        in_chans=1,
        num_classes=10,
    )
    return perturbed(vit, scale=0.3).eval()


def test_eval_top5_per_class_json_and_confusion_png(
    model: VisionTransformer, digits_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = model.save_pretrained(tmp_path / "model")
    assert (
        main(
            ["eval", str(checkpoint), "--data", str(digits_npz), "--json", str(tmp_path / "r.json")]
        )
        == 0
    )
    printed = capsys.readouterr().out

    # The reference: logits of the raw images, top-5 and per-class counted by hand.
    data = np.load(digits_npz)
    images = torch.from_numpy(data["x_test"])[:, None]
    labels = torch.from_numpy(data["y_test"]).long()
    with torch.no_grad():
        logits = model(preprocess(images, (8, 8), 1, EvalPreprocessing.of(model.cfg)))
    top5 = float((logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean())
    predicted = logits.argmax(1)
    per_class = {str(c): float((predicted[labels == c] == c).double().mean()) for c in range(10)}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["top_k"] == 5
    assert report["top_k_accuracy"] == pytest.approx(top5)
    assert 0 < report["accuracy"] < report["top_k_accuracy"] < 1  # the check can fail
    assert report["per_class_accuracy"] == pytest.approx(per_class)
    assert report["accuracy"] == pytest.approx(float((predicted == labels).double().mean()))
    assert f"top-5 accuracy {top5:.4f}" in printed
    for name, accuracy in per_class.items():
        assert f"{name} {accuracy:.4f} (" in printed

    # The confusion matrix drawn beside the JSON, without pyplot.
    with Image.open(tmp_path / "r_confusion.png") as png:
        assert png.format == "PNG"
        width, height = png.size
    assert 300 < width <= 750 and 300 < height <= 650  # a 7.5 x 6.5 inch figure at 100 dpi
    assert "matplotlib.pyplot" not in sys.modules


def test_flip_tta_scores_the_mean_logits_of_each_image_and_its_mirror(
    model: VisionTransformer, digits_npz: Path, tmp_path: Path
) -> None:
    """``vitkit eval --tta flip`` against logits averaged by hand over the images and their
    columns reversed; the scores differ from plain evaluation (the model is not symmetric)."""
    checkpoint = model.save_pretrained(tmp_path / "model")
    reports = {}
    for tta in ("none", "flip"):
        out = tmp_path / f"{tta}.json"
        argv = ["eval", str(checkpoint), "--data", str(digits_npz), "--json", str(out)]
        assert main([*argv, "--tta", tta]) == 0
        reports[tta] = json.loads(out.read_text())
    data = np.load(digits_npz)
    labels = torch.from_numpy(data["y_test"]).long()
    images = torch.from_numpy(data["x_test"])[:, None]
    mirrored = images[..., torch.arange(images.shape[-1] - 1, -1, -1)]
    with torch.no_grad():
        both = [
            model(preprocess(x, (8, 8), 1, EvalPreprocessing.of(model.cfg)))
            for x in (images, mirrored)
        ]
    mean = (both[0] + both[1]) / 2
    accuracy = float((mean.argmax(1) == labels).double().mean())
    loss = float(torch.nn.functional.cross_entropy(mean, labels))
    assert reports["flip"]["accuracy"] == pytest.approx(accuracy)
    assert reports["flip"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert reports["flip"]["loss"] != pytest.approx(reports["none"]["loss"], rel=1e-3)
    assert reports["flip"]["tta"] == "flip" and reports["none"]["tta"] == "none"


def test_flip_translate_tta_adds_the_images_moved_one_pixel_diagonally(
    model: VisionTransformer, digits_npz: Path, tmp_path: Path
) -> None:
    """``--tta flip_translate`` against airbench's scoring written out with numpy: half the
    flip mean of the image, a quarter each of the flip means of the image moved one pixel
    down-right and up-left, the border reflected (``np.pad``'s reflect, not torch's)."""
    checkpoint = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "r.json"
    argv = ["eval", str(checkpoint), "--data", str(digits_npz), "--json", str(out)]
    assert main([*argv, "--tta", "flip_translate"]) == 0
    report = json.loads(out.read_text())
    data = np.load(digits_npz)
    labels = torch.from_numpy(data["y_test"]).long()
    x = preprocess(
        torch.from_numpy(data["x_test"])[:, None], (8, 8), 1, EvalPreprocessing.of(model.cfg)
    ).numpy()
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="reflect")
    views = {"image": x, "down_right": padded[..., :-2, :-2], "up_left": padded[..., 2:, 2:]}
    assert np.array_equal(views["down_right"][..., 1:, 1:], x[..., :-1, :-1])

    def flip_mean(view: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            both = [
                model(torch.from_numpy(np.ascontiguousarray(v))) for v in (view, view[..., ::-1])
            ]
        return (both[0] + both[1]) / 2

    mean = (
        flip_mean(views["image"]) / 2
        + flip_mean(views["down_right"]) / 4
        + flip_mean(views["up_left"]) / 4
    )
    assert report["accuracy"] == pytest.approx(float((mean.argmax(1) == labels).double().mean()))
    loss = float(torch.nn.functional.cross_entropy(mean, labels))
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    flip_only = float(torch.nn.functional.cross_entropy(flip_mean(views["image"]), labels))
    assert report["loss"] != pytest.approx(flip_only, rel=1e-3)  # the translations count
    assert report["tta"] == "flip_translate"


def test_eval_says_which_split_stands_in_for_one_the_data_lacks(
    model: VisionTransformer,
    digits_npz: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Data with only a test split, asked for its validation split: the test split is
    scored, and the output says so rather than print a test score as a validation one."""
    checkpoint = str(model.save_pretrained(tmp_path / "model"))
    reports = {}
    for split in ("val", "test"):
        note_stand_in.cache_clear()
        caplog.clear()
        out = tmp_path / f"{split}.json"
        args = ["eval", checkpoint, "--data", str(digits_npz), "--split", split]
        with caplog.at_level(logging.INFO):
            assert main([*args, "--json", str(out)]) == 0
        reports[split] = json.loads(out.read_text())
        stood_in = f"{digits_npz} has no val split: its test split stands in for it"
        assert (stood_in in caplog.text) == (split == "val")
    assert reports["val"]["accuracy"] == reports["test"]["accuracy"]


def test_eval_top_k_is_all_classes_when_fewer_than_five(tmp_path: Path) -> None:
    """Three classes: top-3, which every image passes."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=8, patch_size=2, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3
    )
    checkpoint = perturbed(vit).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "three.npz",
        x_test=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
        y_test=np.arange(12) % 3,
    )
    out = tmp_path / "three.json"
    assert (
        main(
            [
                "eval",
                str(checkpoint),
                "--data",
                str(tmp_path / "three.npz"),
                "--json",
                str(out),
                "--confusion",
                str(tmp_path / "c.png"),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["top_k"] == 3 and report["top_k_accuracy"] == 1.0
    assert (tmp_path / "c.png").is_file() and not (tmp_path / "three_confusion.png").exists()


def small_digits(folder: Path) -> Path:
    """300 training and 100 test digits as an .npz source with both splits."""
    train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
    data = folder / "digits.npz"
    np.savez(
        data,
        x_train=train_set.images[:300, 0].numpy(),
        y_train=train_set.labels[:300].numpy(),
        x_test=test_set.images[:100, 0].numpy(),
        y_test=test_set.labels[:100].numpy(),
    )
    return data


def test_probe_save_gives_a_model_eval_scores_as_the_probe_did(
    model: VisionTransformer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The saved probe, evaluated by ``vitkit eval`` on the same test split, has the accuracy
    the probe reported; ``predict`` runs on it and names the data's classes."""
    test_set = load_dataset("digits", "test")
    data = small_digits(tmp_path)
    checkpoint = model.save_pretrained(tmp_path / "backbone")
    saved = tmp_path / "probe.safetensors"
    assert (
        main(["probe", str(checkpoint), "--data", str(data), "--save", str(saved), "--json"]) == 0
    )
    probe = json.loads(capsys.readouterr().out)
    assert probe["accuracy"] > 0.5  # the features separate digits: the head is not trivial
    assert main(["eval", str(saved), "--data", str(data), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == probe["accuracy"]
    image = tmp_path / "digit.png"
    Image.fromarray(test_set.images[0, 0].numpy()).save(image)
    capsys.readouterr()
    assert main(["predict", str(saved), str(image)]) == 0
    assert any(str(c) in capsys.readouterr().out for c in range(10))


def test_fewshot_save_gives_a_model_eval_scores_as_its_seed_0_ridge_did(
    model: VisionTransformer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The saved few-shot head (whitening and bias column folded into one linear layer),
    evaluated by ``vitkit eval``, scores what the whitened ridge regression scored for the
    largest shot count and seed 0."""
    data = small_digits(tmp_path)
    checkpoint = model.save_pretrained(tmp_path / "backbone")
    saved = tmp_path / "fewshot.safetensors"
    command = ["fewshot", str(checkpoint), "--data", str(data), "--shots", "2", "10"]
    assert main([*command, "--seeds", "2", "--save", str(saved), "--json"]) == 0
    ridge = json.loads(capsys.readouterr().out)["shots"]["10"]["per_seed"][0]
    assert ridge > 0.3  # the features separate digits: the head is not trivial
    assert main(["eval", str(saved), "--data", str(data), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == pytest.approx(ridge)
