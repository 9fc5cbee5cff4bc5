"""Masked patch prediction through the training loop (``vitkit pretrain``): the loss falls below
what the colours alone predict, the checkpoint fine-tunes, a run killed mid-epoch resumes
bit-identically with its [mask] embedding and head, the few-shot evaluator logs what an
independent computation gives, and a folder of images without class folders pre-trains."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import interrupted_after_checkpoint
from tests.conftest import run_records as records
from vitkit.checkpoints import load_pretrained
from vitkit.cli import main
from vitkit.data import load_dataset, to_model_input
from vitkit.data.base import Batch, SourceInfo
from vitkit.data.folders import read_unlabelled
from vitkit.data.sources import DataOptions, open_source
from vitkit.evaluation import extract_features, fewshot_protocol
from vitkit.training import PRETRAIN_DEFAULTS, TrainConfig, TrainingInterrupted, train
from vitkit.training.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    """256 training and 64 test digits (8 steps of 32 per epoch)."""
    return tiny_digits(256, 64)


def pretrain_config(**values: Any) -> TrainConfig:
    """The preset with a test's values; batch 64 (the default before 2026-12-03) unless given,
    and no label smoothing in an ``augment`` table that replaces the preset's."""
    augment = {"label_smoothing": 0.0, **values.pop("augment", {})}
    return TrainConfig.from_dict(
        {**PRETRAIN_DEFAULTS, "log_every": 1, "batch_size": 64, **values, "augment": augment}
    )


def colour_entropy(images: torch.Tensor, patch: int) -> float:
    """Entropy (nats) of the 3-bit mean colours of grey ``patch`` x ``patch`` patches: the
    loss of the best prediction that ignores the rest of the image. A bin is 255/8 = 31.875
    wide on uint8 values."""
    x = images.numpy().astype(np.float64)[:, 0]
    n, h, w = x.shape
    means = x.reshape(n, h // patch, patch, w // patch, patch).mean(axis=(2, 4))
    levels = np.minimum(np.floor(means / 31.875), 7).astype(int).ravel()
    p = np.bincount(levels, minlength=8) / levels.size
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three epochs of masked patch prediction on the shipped digits (vit_digits)."""
    out = tmp_path_factory.mktemp("runs") / "mpp"
    train(pretrain_config(out=str(out), epochs=3, lr=1e-3, warmup_epochs=0.5, val_fraction=0.1))
    return out


def test_a_short_run_learns_more_than_the_colours(pretrained_run: Path) -> None:
    train_lines, val = records(pretrained_run, "train"), records(pretrained_run, "val")
    # The head starts at zero: the first step's loss is uniform over the 8 grey colours.
    assert train_lines[0]["loss"] == pytest.approx(math.log(8), abs=1e-5)
    assert train_lines[-1]["loss"] < 0.85 * math.log(8)
    # Below the colours' entropy: the model uses the visible patches, not only the prior.
    assert val[-1]["loss"] < colour_entropy(load_dataset("digits", "train").images, patch=2)
    assert [r["step"] for r in val] == [20, 40, 60]  # 1295 images: 20 steps of 64
    summary = json.loads((pretrained_run / "summary.json").read_text())
    assert summary["task"] == "mpp" and summary["best_val_loss"] == min(r["loss"] for r in val)
    assert 0.0 < summary["test_accuracy"] < 1.0
    assert summary["test_images"] == 359  # the shipped digits' test split


def test_the_checkpoint_fine_tunes_without_the_prediction_head(
    pretrained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    best = pretrained_run / "best.safetensors"
    saved = load_file(str(best))
    assert {"state/task/mask_token", "state/task/head.weight", "state/task/head.bias"} <= set(saved)
    backbone = load_pretrained(best)
    assert backbone.cfg.num_classes == 0 and backbone.cfg.representation_size is None
    out = tmp_path / "ft"
    code = main(
        [
            "finetune",
            "--from",
            str(best),
            "--data",
            "digits",
            "--epochs",
            "2",
            "--lr",
            "0.03",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    model = load_pretrained(out / "best.safetensors")
    assert model.cfg.num_classes == 10 and not any(
        "task" in k for k in load_file(str(out / "best.safetensors"))
    )
    # The encoder started from the pre-trained one: its patch embedding moved only a little.
    moved = (model.patch_embed.proj.weight - backbone.patch_embed.proj.weight).norm()
    assert moved < 0.5 * backbone.patch_embed.proj.weight.norm()
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out / "best.safetensors"), "--data", "digits"]) == 0
    correct = round(summary["test_accuracy"] * 359)
    assert f"({correct}/359)" in capsys.readouterr().out


def test_resume_mid_epoch_is_bit_identical_with_the_mask_token_and_head(
    tiny_data: Path, tmp_path: Path
) -> None:
    settings = dict(
        data=str(tiny_data),
        epochs=2,
        batch_size=32,
        lr=1e-3,
        warmup_epochs=0.5,
        checkpoint_every=3,
        dropout=0.1,
        drop_path=0.1,
        val_fraction=0.25,
        augment=dict(random_resized_crop=True, crop_scale=(0.5, 1.0), hflip=True),
    )
    train(pretrain_config(out=str(tmp_path / "whole"), **settings))

    with (
        interrupted_after_checkpoint(3) as steps,  # Ctrl-C right after the 3rd checkpoint
        pytest.raises(TrainingInterrupted, match=r"step 9"),
    ):
        train(pretrain_config(out=str(tmp_path / "cut"), **settings))
    assert steps == [3, 6, 9]  # 192 images: 6 steps an epoch, so step 9 is mid-epoch
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0

    whole = load_file(str(tmp_path / "whole/last.safetensors"))
    cut = load_file(str(tmp_path / "cut/last.safetensors"))
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    assert whole["state/task/mask_token"].abs().sum() > 0  # it trained (it starts at zero)
    assert whole["state/task/head.weight"].abs().sum() > 0
    for split in ("train", "val"):
        drop = "images_per_second"
        left = [
            {k: v for k, v in r.items() if k != drop} for r in records(tmp_path / "whole", split)
        ]
        right = [
            {k: v for k, v in r.items() if k != drop} for r in records(tmp_path / "cut", split)
        ]
        assert left == right, split


def test_the_fewshot_evaluator_logs_what_the_protocol_gives(
    tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fewshot"
    train(
        pretrain_config(
            out=str(out),
            data=str(tiny_data),
            epochs=2,
            batch_size=32,
            evaluators=["val", "fewshot"],
            fewshot_shots=[1, 5],
            fewshot_seeds=2,
            val_fraction=0.25,
        )
    )
    logged = records(out, "fewshot")
    assert [r["step"] for r in logged] == [6, 12]
    assert all(r.keys() >= {"1shot", "5shot"} for r in logged)
    # Independently: features of the whole train split (the run's, validation held out) and
    # the test split from the last checkpoint, through the protocol.
    model = load_pretrained(out / "last.safetensors")
    train_set, _ = load_dataset(str(tiny_data), "train").split(0.25, 0)
    test_set = load_dataset(str(tiny_data), "test")
    expected = fewshot_protocol(
        extract_features(model, train_set),
        train_set.labels,
        extract_features(model, test_set),
        test_set.labels,
        shots=[1, 5],
        seeds=[0, 1],
        num_classes=10,
    )
    assert logged[-1]["1shot"] == pytest.approx(expected[1]["mean"], abs=1e-9)
    assert logged[-1]["5shot"] == pytest.approx(expected[5]["mean"], abs=1e-9)
    assert (out / "curves.png").stat().st_size > 10_000


def test_the_hybrid_pretrains_on_its_1x1_patches(tmp_path: Path) -> None:
    """vit_cifar_hybrid: 1x1 patches of the ResNet map, each standing for 4x4 pixels. The head
    starts at zero, so the first step's L2 loss on per-patch normalised pixels is their mean
    square: 1 (less the 1e-6 of the normalisation)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "rgb.npz"
    np.savez(
        data,
        images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        labels=np.zeros(20, dtype=np.int64),
    )
    out = tmp_path / "hybrid"
    train(
        pretrain_config(
            model="vit_cifar_hybrid",
            data=str(data),
            epochs=1,
            batch_size=8,
            mpp_target="pixels",
            out=str(out),
        )
    )
    first = records(out, "train")[0]
    assert first["loss"] == pytest.approx(1.0, abs=1e-4)
    assert "accuracy" not in first  # a regression has none
    assert load_file(str(out / "last.safetensors"))["state/task/head.weight"].shape == (48, 192)


# ------------------------------------------------------------------ unlabelled data


@pytest.fixture(scope="module")
def unlabelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 digits as PNGs: 100 directly in the folder, 60 in a nested sub-folder."""
    root = tmp_path_factory.mktemp("unlabelled")
    (root / "more/deeper").mkdir(parents=True)
    images = load_dataset("digits", "train").images[:160, 0].numpy()
    for i, image in enumerate(images):
        where = root if i < 100 else root / "more/deeper"
        Image.fromarray(image).save(where / f"{i:03d}.png")
    return root


def test_a_streamed_batch_is_not_cropped_twice() -> None:
    """A streamed source crops each image in its workers (``Batch.cropped``): with the
    random-resized crop on, pre-training scales such a batch as it is (no flip in this
    config), and crops one that is not."""
    augment = {"random_resized_crop": True, "crop_scale": [0.1, 0.2]}
    cfg = pretrain_config(data="digits", model="vit_digits", augment=augment)
    task = TASKS["mpp"](cfg)
    model = task.build_model(SourceInfo(None, 1, 8))
    task.setup(model)
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    images = images.byte()
    as_given, _ = task.prepare(Batch(images, None, cropped=True), seed=0)
    assert torch.equal(as_given, to_model_input(images))
    recropped, _ = task.prepare(Batch(images, None), seed=0)
    assert not torch.allclose(recropped, as_given)


def test_an_unlabelled_folder_pretrains(
    unlabelled_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("VITKIT_CACHE", "off")
    images = read_unlabelled(unlabelled_folder)
    assert images is not None and images.shape == (160, 1, 8, 8)
    expected = load_dataset("digits", "train").images[:160]
    assert torch.equal(images, expected)  # the root's images first, then the sub-folders'
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(unlabelled_folder),
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--val-fraction",
                "0.25",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] is None and summary["steps"] == 3  # 128 - 32 = 96 images
    # The last line names what the accuracy counts: no class of an image is predicted.
    line = capsys.readouterr().out.splitlines()[-1]
    accuracy = f"test accuracy of the corrupted patches' colours {summary['test_accuracy']:.2%}"
    assert line.startswith(accuracy + ", test loss per corrupted patch ")
    assert load_pretrained(out / "best.safetensors").cfg.in_chans == 1


def test_classification_refuses_an_unlabelled_folder(
    unlabelled_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITKIT_CACHE", "off")
    out = tmp_path / "refused"
    assert main(["train", "--data", str(unlabelled_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no labels" in err and "<class>/<image>" in err and "vitkit pretrain" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="not in class folders: it has no labels"):
        load_dataset(unlabelled_folder)
    # Shards store a label with every image: packing refuses it, and writes nothing.
    assert main(["data", "pack", str(unlabelled_folder), str(out)]) == 2
    assert "has no labels" in capsys.readouterr().err and not out.exists()
    # A split of it, streamed or not, says why it cannot be scored (not "has no images").
    for in_memory in ("auto", "no"):
        with pytest.raises(ValueError, match="not in class folders: it has no labels"):
            open_source(str(unlabelled_folder), "test", DataOptions(in_memory=in_memory))
    # The few-shot evaluator needs labelled images: named, it takes them from there.
    args = ["pretrain", "--data", str(unlabelled_folder), "--evaluators", "fewshot"]
    assert main([*args, "--out", str(out)]) == 2
    assert "--fewshot-data" in capsys.readouterr().err


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(mpp_rate=0.0), "rate must be in"),
        (dict(mpp_target="colour"), "target must be"),
        (dict(augment=dict(mixup=0.2)), "set mixup to 0"),
        (dict(model="resnetv2_digits"), "not a ViT"),
        (dict(patch_dropout=0.5), "set patch_dropout to 0"),
    ],
)
def test_bad_pretraining_settings_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(pretrain_config(**values, out="/nonexistent/never-created"))
