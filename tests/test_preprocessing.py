"""One evaluation preprocessing (``EvalPreprocessing``), recorded with the model and applied
alike by ``vitkit predict``, ``vitkit eval`` (streamed and in memory), the training run's
validation and the Hugging Face export; ``eval --predictions``; ``--model`` checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.checkpoints import export
from vitkit.cli import main
from vitkit.data import EvalPreprocessing, preprocess, preprocess_file
from vitkit.evaluation.inference import class_names
from vitkit.models.preprocessing import RECORD_KEY
from vitkit.training import TrainConfig, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "eel"]
CROP = EvalPreprocessing(resize="crop", crop_pct=0.75)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random picture whose border differs from its centre, so squash and crop see
    different images."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-200, 200, (2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_folder(root: Path) -> list[Path]:
    """12 photos in 3 class folders, as a phone gives them: both orientations and several
    sizes, an EXIF-rotated JPEG, a CMYK JPEG, an RGBA PNG, a grey image."""
    rng = np.random.default_rng(0)
    sizes = [(200, 150), (150, 200), (160, 120), (96, 128)]
    paths = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            picture = photo(rng, w, h)
            path = root / name / f"{i}.jpg"
            kind = (c * len(sizes) + i) % 4
            if kind == 0:  # stored on its side, upright by EXIF orientation 6
                exif = Image.Exif()
                exif[0x0112] = 6
                picture.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
            elif kind == 1:
                picture.convert("CMYK").save(path, quality=90)
            elif kind == 2:
                path = path.with_suffix(".png")
                rgba = picture.convert("RGBA")
                rgba.putalpha(128)
                rgba.save(path)
            else:
                path = path.with_suffix(".png")
                picture.convert("L").save(path)
            paths.append(path)
    return paths


def tiny_model(tmp_path: Path, preprocessing: EvalPreprocessing | None) -> Path:
    extra: dict = {"classes": CLASSES}
    if preprocessing is not None:
        extra[RECORD_KEY] = preprocessing.to_dict()
    model = vitkit.create_model("vit_micro", num_classes=len(CLASSES), extra=extra)
    with torch.no_grad():  # a random head: the zero-initialised one gives every image 1/3
        model.head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    return model.save_pretrained(tmp_path / "model")


# ---------------------------------------------------------------------------- the contract


def test_the_record_round_trips_and_old_configs_get_the_default() -> None:
    assert EvalPreprocessing.from_dict(CROP.to_dict()) == CROP
    assert EvalPreprocessing.of(vitkit.create_model("vit_micro").cfg) == EvalPreprocessing()
    assert EvalPreprocessing().resize == "squash"  # the official code and Hugging Face
    with pytest.raises(ValueError, match="unknown preprocessing record keys"):
        EvalPreprocessing.from_dict({"resize": "squash", "colour": "sepia"})
    with pytest.raises(ValueError, match="resize must be one of"):
        EvalPreprocessing(resize="pad")  # type: ignore[arg-type]


def test_squash_keeps_the_border_and_crop_drops_it() -> None:
    """An image with a red frame 1/8 wide around a blue centre: squashed, the model input
    still has red at its edge; cropped to 0.75 of the shorter side, none is left."""
    image = torch.zeros(1, 3, 40, 80, dtype=torch.uint8)
    image[:, 0] = 255
    image[:, :, 5:35, 10:70] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]
    squashed = preprocess(image, (16, 16), 3)
    cropped = preprocess(image, (16, 16), 3, CROP)
    assert squashed[0, 0, 0, 0] > 0.99 and squashed[0, 0, 8, 8] < -0.99
    assert (cropped[0, 0] < -0.99).all() and (cropped[0, 2] > 0.99).all()
    # the value range: (pixel / 255 - mean) / std
    scaled = preprocess(image, (16, 16), 3, EvalPreprocessing(mean=0.0, std=1.0))
    assert scaled[0, 0, 0, 0] == pytest.approx(1.0) and scaled[0, 2, 0, 0] == pytest.approx(0.0)


# ----------------------------------------------------------- predict and eval agree on files


@pytest.mark.parametrize("preprocessing", [None, CROP], ids=["default", "crop"])
def test_eval_predictions_agree_with_predict_on_every_photo(
    tmp_path: Path, preprocessing: EvalPreprocessing | None, capsys: pytest.CaptureFixture
) -> None:
    paths = photo_folder(tmp_path / "photos")
    ckpt = tiny_model(tmp_path, preprocessing)
    out = tmp_path / "predictions.csv"
    code = main(
        [
            "eval",
            str(ckpt),
            "--data",
            str(tmp_path / "photos"),
            "--device",
            "cpu",
            "--batch-size",
            "5",
            "--predictions",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    with out.open() as f:
        rows = list(csv.DictReader(f))
    header = ["path", "true", *(f"{c}{i}" for i in (1, 2, 3) for c in ("pred", "prob"))]
    assert list(rows[0]) == header  # three classes: the top 3
    assert sorted(Path(r["path"]) for r in rows) == sorted(paths)
    assert len({row["prob1"] for row in rows}) > len(rows) // 2  # it tells them apart
    model = vitkit.load_pretrained(ckpt)
    for row in rows:
        (top,) = predict(model, row["path"], top_k=3)
        assert row["true"] == Path(row["path"]).parent.name
        assert [row[f"pred{i}"] for i in (1, 2, 3)] == [name for name, _ in top]
        probs = [float(row[f"prob{i}"]) for i in (1, 2, 3)]
        assert probs == pytest.approx([p for _, p in top], abs=2e-6)
        capsys.readouterr()
        assert main(["predict", str(ckpt), row["path"], "--top-k", "1", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.split(": ")[1].startswith(row["pred1"] + " ")


def test_files_become_the_same_model_input_in_predict_and_a_streamed_eval(
    tmp_path: Path,
) -> None:
    """The exact tensor the model sees, for every photo, by both paths."""
    paths = photo_folder(tmp_path / "photos")
    model = vitkit.load_pretrained(tiny_model(tmp_path, CROP))
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        from vitkit.data.sources import DataOptions, open_source

        source = open_source(str(tmp_path / "photos"), "test", DataOptions("no", 0))
        result = vitkit.training.evaluate(model, source, batch_size=len(paths), top_k=1)
    finally:
        hook.remove()
    (streamed,) = seen
    by_path = {p.name: i for i, p in enumerate(result.predictions)}
    for path in paths:
        index = by_path[str(path)]
        assert torch.equal(streamed[index : index + 1], preprocess_file(path, model.cfg))


def test_predictions_of_an_in_memory_source_are_numbered(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 3, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(7) % 3)
    ckpt = tiny_model(tmp_path, None)
    out = tmp_path / "p.csv"
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "--data",
                str(tmp_path / "d.npz"),
                "--device",
                "cpu",
                "--predictions",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.reader(out.open()))
    assert rows[0][:2] == ["index", "true"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(7)]
    model = vitkit.load_pretrained(ckpt)
    tops = predict(model, torch.from_numpy(images), top_k=1)
    assert [r[2] for r in rows[1:]] == [top[0][0] for top in tops]


def test_predict_reports_an_unreadable_file_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = photo_folder(tmp_path / "photos")[:2]
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a picture")
    ckpt = tiny_model(tmp_path, None)
    code = main(["predict", str(ckpt), str(good[0]), str(junk), str(good[1]), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [str(p) for p in good]
    assert "junk.jpg is not an image Pillow can read" in captured.err
    assert "1 of 3 images could not be read" in captured.err


# ------------------------------------------------------------------- recorded with the model


def test_a_training_run_records_its_preprocessing_and_eval_reproduces_its_accuracy(
    tmp_path: Path,
) -> None:
    photo_folder(tmp_path / "photos")
    for extra in range(2):  # 24 photos: 8 a class
        for path in sorted((tmp_path / "photos").rglob("*.*")):
            if path.stem.isdigit():
                Image.open(path).save(path.with_stem(f"{path.stem}_{extra}"))
    out = tmp_path / "run"
    summary = train(
        TrainConfig.from_dict(
            dict(
                model="vit_micro",
                data=str(tmp_path / "photos"),
                data_in_memory="no",
                num_workers=0,
                steps=2,
                batch_size=4,
                val_fraction=0.25,
                out=str(out),
                device="cpu",
                augment=dict(random_resized_crop=False),
                evaluators=["val"],
            )
        )
    )
    model = vitkit.load_pretrained(out / "best.safetensors")
    assert model.cfg.extra[RECORD_KEY] == EvalPreprocessing().to_dict()
    from vitkit.evaluation.splits import evaluation_data

    source, _ = evaluation_data(str(tmp_path / "photos"), "test", out)
    again = vitkit.training.evaluate(model.cpu(), source)
    assert summary["test_accuracy"] == pytest.approx(again.accuracy)
    assert summary["test_loss"] == pytest.approx(again.loss, rel=1e-5)


def test_hf_export_writes_a_processor_that_preprocesses_alike(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = photo_folder(tmp_path / "photos")[1]
    model = vitkit.create_model("vit_micro", num_classes=3, img_size=48)
    export(model, tmp_path / "hf", "hf")
    processor_file = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor_file["image_processor_type"] == "ViTImageProcessor"
    assert processor_file["size"] == {"height": 48, "width": 48}
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "hf")
    theirs = processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    ours = preprocess_file(path, model.cfg)
    assert (theirs - ours).abs().mean() < 0.02  # both PIL bilinear; ours decodes the JPEG once

    cropped = vitkit.create_model("vit_micro", num_classes=3, extra={RECORD_KEY: CROP.to_dict()})
    export(cropped, tmp_path / "hf_crop", "hf")
    written = json.loads((tmp_path / "hf_crop" / "preprocessor_config.json").read_text())
    assert written["image_processor_type"] == "ConvNextImageProcessor"
    assert written["crop_pct"] == 0.75
    back = vitkit.load_pretrained(tmp_path / "hf_crop")
    assert EvalPreprocessing.of(back.cfg) == CROP


# --------------------------------------------------------------------------------- --model


def test_a_model_name_that_contradicts_the_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    micro = vitkit.create_model("vit_micro", num_classes=3)
    npz = export(micro, tmp_path / "micro.npz", "official")
    image = photo_folder(tmp_path / "photos")[0]
    code = main(["predict", str(npz), str(image), "--model", "vit_digits", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    # the fields that differ, on both sides (the widths agree: not shown)
    assert "micro.npz holds a vit_micro-sized model (depth 2, " in err
    assert "but --model says vit_digits (depth 4, " in err
    for command in (
        ["inspect", str(npz)],
        ["convert", str(npz), str(tmp_path / "c.npz"), "--to", "official"],
    ):
        assert main([*command, "--model", "vit_digits"]) == 2
        assert "--model says vit_digits" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"holds a vit_micro-sized model .* says resnetv2_digits"):
        vitkit.load_pretrained(npz, "resnetv2_digits")
    # the matching name, or none, is fine; a name that only fills in the heads is used
    assert main(["predict", str(npz), str(image), "--model", "vit_micro", "--device", "cpu"]) == 0
    timm_file = export(micro, tmp_path / "micro.pth", "timm")
    assert vitkit.load_pretrained(timm_file, "vit_micro").cfg.num_heads == micro.cfg.num_heads
    assert class_names(vitkit.load_pretrained(npz)) == ["0", "1", "2"]


def test_a_fine_tuned_model_keeps_its_checkpoints_preprocessing(tmp_path: Path) -> None:
    from vitkit.data.base import SourceInfo
    from vitkit.training.tasks import build_task

    ckpt = tiny_model(tmp_path, CROP)
    info = SourceInfo(["a", "b"], 3, 10)
    fine_tuned = build_task(TrainConfig(init_from=str(ckpt), data="x", model=None)).build_model(
        info
    )
    assert EvalPreprocessing.of(fine_tuned.cfg) == CROP
    assert fine_tuned.cfg.extra["classes"] == ["a", "b"]
    new = build_task(TrainConfig(model="vit_micro", data="x")).build_model(info)
    assert new.cfg.extra[RECORD_KEY] == EvalPreprocessing().to_dict()
