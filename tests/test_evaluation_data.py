"""What ``vitkit fewshot`` and ``vitkit probe`` fit on and score on, and what they say about it.

The reference for "scored on images no fitting saw" is chance level: a randomly initialised
ViT on noise images with random labels cannot beat it on held-out images, while scoring on
the images it was fitted on (the old behaviour on single-split data) lands far above it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.cli import main
from vitkit.cli.fewshot import frozen_features
from vitkit.data.sources import DataOptions, open_splits
from vitkit.evaluation import extract_features
from vitkit.evaluation.features import source_features
from vitkit.models.vit import VisionTransformer
from vitkit.utils.runlayout import RunLayout

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, PER_CLASS = 10, 15  # 15 a class: 3 held out (round(0.2 * 15)), 12 to fit on
CHANCE_BOUND = 0.4  # 30 test images at chance 0.1: 0.4 is over five standard deviations up


def random_vit(in_chans: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=8,
        patch_size=2,
        width=32,
        depth=1,
        num_heads=2,
        mlp_dim=64,
        num_classes=CLASSES,
        in_chans=in_chans,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_vit().save_pretrained(tmp_path_factory.mktemp("ckpt") / "random_vit")


def noise(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uint8 RGB noise images (N, 8, 8, 3) and random labels, PER_CLASS a class."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(CLASSES), count // CLASSES))
    return rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8), labels


def noise_folder(root: Path, per_class: int = PER_CLASS, sizes: tuple[int, ...] = (8,)) -> Path:
    """A single-split folder of class folders; several ``sizes`` make ``auto`` stream it."""
    images, labels = noise(per_class * CLASSES, seed=1)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        side = sizes[i % len(sizes)]
        Image.fromarray(image).resize((side, side)).save(root / f"c{label}" / f"{i}.png")
    return root


def noise_npz(path: Path) -> Path:
    images, labels = noise(PER_CLASS * CLASSES, seed=2)
    np.savez(path, images=images, labels=labels)
    return path


def run_json(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert main([*argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


COMMANDS = {
    # All 12 training images of a class, weakly regularised: fitted on the very images it is
    # scored on (12 of each 15), it would score far above chance.
    "fewshot": ["fewshot", "--shots", "12", "--seeds", "2", "--l2-reg", "1"],
    "linear": ["probe", "--method", "linear"],
    "knn": ["probe", "--method", "knn"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["folder", "streamed folder", "npz"])
def test_single_split_data_is_scored_on_held_out_images_at_chance(
    checkpoint: Path, tmp_path: Path, kind: str, command: str, capsys: pytest.CaptureFixture
) -> None:
    if kind == "npz":
        data = noise_npz(tmp_path / "noise.npz")
    else:
        data = noise_folder(tmp_path / "noise", sizes=(8, 10) if kind != "folder" else (8,))
    name, *flags = COMMANDS[command]
    out = run_json([name, str(checkpoint), "--data", str(data), *flags], capsys)
    accuracy = out["shots"]["12"]["mean"] if name == "fewshot" else out["accuracy"]
    assert accuracy < CHANCE_BOUND
    assert out["held_out_test"] is True and out["test_fraction"] == 0.2
    assert out["split_seed"] == 0 and out["run_test_split"] is False
    assert (out["train_images"], out["test_images"]) == (120, 30)
    assert out["skipped_files"] == 0


def test_the_text_output_says_what_was_held_out(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = noise_npz(tmp_path / "noise.npz")
    argv = ["probe", str(checkpoint), "--data", str(data), "--seed", "4", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "20% of" in out and "held out" in out and "seed 4" in out
    assert "fitted on 120, scored on 30 images" in out


def test_the_seed_chooses_the_held_out_images(checkpoint: Path, tmp_path: Path) -> None:
    data = str(noise_npz(tmp_path / "noise.npz"))
    model = random_vit()  # the checkpoint's weights: the same seed
    for seed in (0, 3):
        args = argparse.Namespace(
            checkpoint=str(checkpoint),
            data=data,
            seed=seed,
            batch_size=64,
            model=None,
            device="cpu",
            max_unreadable_fraction=None,
        )
        features = frozen_features(args)
        expected = open_splits(data, 0.0, seed).test  # train's own held-out images
        torch.testing.assert_close(features.test_x, extract_features(model, expected))


def test_a_run_folder_is_scored_on_its_own_test_images(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = str(noise_npz(tmp_path / "noise.npz"))
    run = RunLayout(tmp_path / "run")
    random_vit().save_pretrained(run.best)
    run.config.write_text(json.dumps({"data": data, "seed": 7, "val_fraction": 0.25}))
    run.metrics.write_text("")
    out = run_json(["probe", str(run.path), "--data", data, "--method", "knn", "-k", "1"], capsys)
    assert out["run_test_split"] is True and out["split_seed"] == 7
    splits = open_splits(data, 0.25, 7)  # the run's train (less validation) and test images
    assert (out["train_images"], out["test_images"]) == (len(splits.train), len(splits.test))


def test_too_few_images_for_a_held_out_class_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = noise_folder(tmp_path / "noise", per_class=2)  # round(0.2 * 2) = 0 test images
    assert main(["fewshot", str(checkpoint), "--data", str(data), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert "without a test image" in error and "at least 3" in error and "\n" not in error


def test_knn_with_more_neighbours_than_training_images_says_so(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = str(noise_npz(tmp_path / "noise.npz"))
    argv = ["probe", str(checkpoint), "--data", data, "--method", "knn", "-k", "100000"]
    assert main([*argv, "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["k"] == 100000 and out["k_used"] == 120
    assert "-k 100000" in captured.err and "120 training images" in captured.err


def test_a_grey_model_on_rgb_images_says_it_converts(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grey = random_vit(in_chans=1).save_pretrained(tmp_path / "grey")
    data = str(noise_npz(tmp_path / "noise.npz"))
    for argv in (["probe", str(grey), "--data", data], ["eval", str(grey), "--data", data]):
        assert main([*argv, "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert "takes 1 channel(s) and the data has 3: converting the images to grey" in err


def test_unreadable_files_are_skipped_and_counted(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = noise_folder(tmp_path / "noise")
    (data / "c0" / "truncated.png").write_bytes(
        (data / "c0" / next(p.name for p in (data / "c0").iterdir())).read_bytes()[:40]
    )
    (data / "c1" / "notes.jpg").write_text("not an image")
    out = run_json(["probe", str(checkpoint), "--data", str(data)], capsys)
    assert out["skipped_files"] == 2
    assert out["train_images"] + out["test_images"] == PER_CLASS * CLASSES


def test_shards_are_read_streamed(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = noise_npz(tmp_path / "noise.npz")
    assert main(["data", "pack", str(data), str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    out = run_json(["probe", str(checkpoint), "--data", str(tmp_path / "shards")], capsys)
    assert out["held_out_test"] is True  # pack held the test split out
    assert out["train_images"] + out["test_images"] == PER_CLASS * CLASSES
    assert out["accuracy"] < CHANCE_BOUND


def test_source_features_keep_the_labels_of_a_streamed_source(tmp_path: Path) -> None:
    data = noise_folder(tmp_path / "noise", sizes=(8, 10))
    source = open_splits(str(data), 0.0, 0, DataOptions(in_memory="no", num_workers=0)).test
    features, labels = source_features(random_vit(), source, batch_size=7)
    assert features.shape == (30, 32) and labels is not None
    assert labels.tolist() == source.labels.tolist()  # type: ignore[attr-defined]


def test_source_features_leave_out_the_rows_of_unreadable_files(tmp_path: Path) -> None:
    data = noise_folder(tmp_path / "noise", sizes=(8, 10))
    (data / "c1" / "broken.png").write_bytes(b"not an image")
    splits = open_splits(
        str(data), 0.0, 0, DataOptions(in_memory="no", num_workers=0, max_unreadable_fraction=0.5)
    )
    source: Any = next(s for s in (splits.train, splits.test) if b"c1/broken.png" in s.files)
    files = [f.decode() for f in source.files]
    model = random_vit()
    features, labels = source_features(model, source, batch_size=7)
    readable = [i for i, f in enumerate(files) if f != "c1/broken.png"]
    assert features.shape == (len(files) - 1, 32) and labels is not None
    assert labels.tolist() == [int(source.labels[i]) for i in readable]
    # Each row is its own file's features, computed alone.
    for row in (0, len(readable) - 1):
        alone = source_features(model, source.subset(torch.tensor([readable[row]])), 1)[0]
        torch.testing.assert_close(features[row], alone[0])
