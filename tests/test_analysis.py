"""The paper's analyses against hand-computed values, and ``vitkit analyze`` end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import VisionTransformer, create_model
from vitkit.analysis import (
    NotApplicable,
    analyze,
    attention_maps,
    attention_rollout,
    collect_attentions,
    embedding_filter_components,
    mean_attention_distance,
    position_embedding_similarity,
    rollout_matrix,
)
from vitkit.analysis.inputs import load_images, sample_dataset
from vitkit.analysis.report import MAX_SHOWN_FILES
from vitkit.cli import main
from vitkit.data import preprocess_file
from vitkit.training.run import RunFolder


def stack(*layers: list[list[list[float]]]) -> np.ndarray:
    """Per-layer (heads, N, N) attention of one image as (layers, 1, heads, N, N)."""
    return np.array(layers, dtype=np.float64)[:, None]


def uniform(n: int) -> list[list[float]]:
    return np.full((n, n), 1.0 / n).tolist()


# ----------------------------------------------------------------- mean attention distance
def test_distance_of_heads_attending_to_themselves_is_zero() -> None:
    eye = np.eye(9).tolist()
    assert np.allclose(mean_attention_distance(stack([eye, eye]), (3, 3), (16, 16), 0), 0.0)


def test_distance_of_uniform_attention_on_2x2_grid() -> None:
    # Every query sees itself (0), two neighbours (16) and the diagonal (16 * sqrt 2).
    distances = mean_attention_distance(stack([uniform(4)]), (2, 2), (16, 16), 0)
    assert distances == pytest.approx(np.array([[(0 + 16 + 16 + 16 * math.sqrt(2)) / 4]]))


def test_distance_of_uniform_attention_on_3x3_grid() -> None:
    # Over the 81 ordered pairs of a 3x3 grid the offsets (|dx|, |dy|) occur 3, 4, 2 times
    # per axis for 0, 1, 2: the summed length is 48 + 24 sqrt 2 + 16 sqrt 5 patch sides.
    expected = 10 * (48 + 24 * math.sqrt(2) + 16 * math.sqrt(5)) / 81
    distances = mean_attention_distance(stack([uniform(9)]), (3, 3), (10, 10), 0)
    assert distances == pytest.approx(np.array([[expected]]))


def test_distance_uses_each_axis_patch_size() -> None:
    # A 2x2 grid of 4 (tall) x 8 (wide) pixel patches; each head looks at one fixed neighbour.
    right = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    below = [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]
    diagonal = [[0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    distances = mean_attention_distance(stack([right, below, diagonal]), (2, 2), (4, 8), 0)
    assert distances == pytest.approx(np.array([[8, 4, math.sqrt(80)]]))


def test_distance_leaves_out_class_token_and_renormalises() -> None:
    # Grid 1x2: each patch gives half its attention to [class], half to the other patch;
    # the [class] token's own row is ignored whatever it holds.
    attn = [[1, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    assert mean_attention_distance(stack([attn]), (1, 2), (16, 16), 1) == pytest.approx(
        np.array([[16]])
    )


def test_distance_averages_over_images_per_layer() -> None:
    eye, swap = np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])
    # layers 2, images 2, heads 1: layer 1 sees itself then swaps, layer 2 always swaps.
    attn = np.array([[[eye], [swap]], [[swap], [swap]]])
    assert mean_attention_distance(attn, (1, 2), (16, 16), 0) == pytest.approx(
        np.array([[8], [16]])
    )


def test_distance_rejects_tokens_that_do_not_fit_the_grid() -> None:
    with pytest.raises(ValueError, match="3x3 grid"):
        mean_attention_distance(stack([uniform(4)]), (3, 3), (16, 16), 0)


# ------------------------------------------------------------------------------- rollout
def test_rollout_of_one_layer_adds_the_residual() -> None:
    # [class] attends only to patch 1: with the identity added and rows renormalised the
    # [class] token keeps half of itself and takes half of patch 1.
    attn = [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert attention_rollout(stack([attn]), (1, 2), 1) == pytest.approx(np.array([[[0.5, 0]]]))


def test_rollout_multiplies_layers_last_on_the_left() -> None:
    # Layer 1: patch 1 attends to patch 2. Layer 2: [class] attends to patch 1. Through the
    # residuals, [class] ends as 1/2 itself, 1/4 patch 1, 1/4 patch 2 (patch 2 reaches it via
    # patch 1 of layer 1). Multiplying in the other order would give (1/2, 0).
    first = [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    second = [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    joint = rollout_matrix(stack([first], [second]))
    assert joint[0] == pytest.approx(np.array([[0.5, 0.25, 0.25], [0, 0.5, 0.5], [0, 0, 1]]))
    assert attention_rollout(stack([first], [second]), (1, 2), 1)[0] == pytest.approx(
        np.array([[0.25, 0.25]])
    )


def test_rollout_averages_heads() -> None:
    # Head means: [class] row (1/2, 1/2, 0); plus identity and renormalised: (3/4, 1/4, 0).
    eye = np.eye(3).tolist()
    to_patch = [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert attention_rollout(stack([eye, to_patch]), (1, 2), 1) == pytest.approx(
        np.array([[[0.25, 0.0]]])
    )


def test_rollout_of_gap_model_averages_patch_rows() -> None:
    # No [class] token: patch 1 attends to patch 2, patch 2 to itself -> rows (1/2, 1/2) and
    # (0, 1), mean (1/4, 3/4).
    attn = [[0, 1], [0, 1]]
    assert attention_rollout(stack([attn]), (1, 2), 0) == pytest.approx(np.array([[[0.25, 0.75]]]))


def test_rollout_rows_stay_distributions() -> None:
    logits = torch.randn(4, 2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    joint = rollout_matrix(logits.softmax(-1).numpy())
    assert joint.shape == (2, 5, 5)
    assert joint.sum(axis=-1) == pytest.approx(np.ones((2, 5)))
    assert (joint >= 0).all()


# ------------------------------------------------------------------------ attention maps
def test_attention_maps_take_class_row_or_mean_of_patch_rows() -> None:
    token = [[0.1, 0.2, 0.3, 0.4], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert attention_maps(stack([token]), (1, 3), 1) == pytest.approx(
        np.array([0.2, 0.3, 0.4]).reshape(1, 1, 1, 1, 3)
    )
    # gap: column means (1 + 0 + 1/2, 0 + 0 + 1/2, 0 + 1 + 0) / 3
    gap = [[1, 0, 0], [0, 0, 1], [0.5, 0.5, 0]]
    assert attention_maps(stack([gap]), (1, 3), 0) == pytest.approx(
        np.array([1 / 2, 1 / 6, 1 / 3]).reshape(1, 1, 1, 1, 3)
    )


def test_collect_attentions_of_a_model() -> None:
    model = create_model("vit_micro", num_classes=3)
    attn = collect_attentions(model, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert attn.shape == (2, 2, 4, 65, 65)  # depth, batch, heads, [class] + 8x8 patches
    assert attn.sum(axis=-1) == pytest.approx(np.ones((2, 2, 4, 65)), abs=1e-5)
    distances = mean_attention_distance(attn, model.cfg.grid, (4, 4), 1)
    assert ((distances > 0) & (distances < 28 * math.sqrt(2))).all()


# ------------------------------------------------------------------------------ embeddings
def test_sincos_position_similarity_peaks_on_the_diagonal_and_is_symmetric() -> None:
    model = create_model("vit_micro", pos_embed="sincos_2d", img_size=(24, 32))
    sim = position_embedding_similarity(model)
    gh, gw = 6, 8
    assert sim.shape == (gh, gw, gh, gw)
    flat = sim.reshape(gh * gw, gh * gw)
    assert flat == pytest.approx(flat.T)
    assert np.diag(flat) == pytest.approx(np.ones(gh * gw))
    off_diagonal = flat[~np.eye(gh * gw, dtype=bool)].reshape(gh * gw, -1)
    assert (off_diagonal.max(axis=1) < 1 - 1e-6).all()
    # One pair against torch's own cosine similarity: patch (0, 0) and patch (2, 5).
    emb = model.pos_embed.patch_embeddings()
    expected = torch.cosine_similarity(emb[0], emb[2 * gw + 5], dim=0).item()
    assert sim[0, 0, 2, 5] == pytest.approx(expected, abs=1e-6)


def test_position_similarity_is_not_applicable_without_embeddings() -> None:
    for kind in ("relative", "none"):
        with pytest.raises(NotApplicable, match=kind):
            position_embedding_similarity(create_model("vit_micro", pos_embed=kind))


def test_filter_components_recover_the_filters_subspace() -> None:
    model = create_model("vit_micro")  # 64 filters of 3x4x4 = 48 values
    rng = np.random.default_rng(0)
    u, v = np.linalg.qr(rng.normal(size=(48, 2)))[0].T
    a, b = rng.normal(0, 3.0, size=64), rng.normal(0, 1.0, size=64)
    a, b = a - a.mean(), b - b.mean()
    b -= (a @ b) / (a @ a) * a  # uncorrelated scores: the principal axes are exactly u and v
    offset = rng.normal(size=48)  # a common mean, which PCA must remove
    filters = offset + a[:, None] * u + b[:, None] * v
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(torch.from_numpy(filters.reshape(64, 3, 4, 4)))
    pca = embedding_filter_components(model, num_components=3)
    assert pca.components.shape == (3, 3, 4, 4)
    first, second = pca.components.reshape(3, 48)[:2]
    assert abs(first @ u) == pytest.approx(1.0, abs=1e-6)  # weights are float32
    assert abs(second @ v) == pytest.approx(1.0, abs=1e-6)
    share = (a**2).sum() / ((a**2).sum() + (b**2).sum())
    assert pca.explained_variance_ratio == pytest.approx([share, 1 - share, 0], abs=1e-6)


def test_filter_components_not_applicable_to_hybrid() -> None:
    hybrid = VisionTransformer(
        img_size=16, patch_size=1, resnet_layers=(1,), width=32, depth=1, num_heads=2, mlp_dim=32
    )
    with pytest.raises(NotApplicable, match="hybrid"):
        embedding_filter_components(hybrid)


# ---------------------------------------------------------------------- vitkit analyze
CLASSES = ["cat", "dog", "frog"]


def make_run_folder(folder: Path) -> Path:
    """A tiny run folder written as ``vitkit train --out`` writes it, with a 6-image dataset."""
    run = RunFolder(folder)
    folder.mkdir(parents=True)
    create_model("vit_micro", num_classes=3).save_pretrained(run.best)
    rng = np.random.default_rng(0)
    data = folder.parent / "tiny.npz"
    np.savez(
        data,
        x_test=rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8),
        y_test=np.array([0, 1, 2, 0, 1, 2]),
        classes=np.array(CLASSES),
    )
    run.write_json(run.config, {"model": "vit_micro", "data": str(data)})
    for step in range(1, 6):
        run.log({"split": "train", "step": step, "loss": 1.2 - 0.1 * step, "accuracy": 0.1 * step})
    run.log({"split": "val", "epoch": 1, "step": 5, "loss": 1.0, "accuracy": 0.5})
    run.plot_curves()
    summary = {
        "test_accuracy": 0.5,
        "best_val_accuracy": 0.5,
        "epochs": 1,
        "classes": CLASSES,
        "confusion_matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]],
    }
    run.write_json(run.summary, summary)
    return folder


def linked_images(report: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', report.read_text())


def test_analyze_run_folder_writes_every_section(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    report = analyze(run, tmp_path / "out", num_images=2, distance_images=6)
    html = report.read_text()
    expected = {
        "attention-maps-1.png",
        "attention-maps-2.png",
        "attention-rollout.png",
        "attention-distance.png",
        "position-similarity.png",
        "embedding-filters.png",
        "training-curves.png",
        "confusion-matrix.png",
    }
    assert set(linked_images(report)) == expected
    for name in expected:
        with Image.open(tmp_path / "out" / name) as img:
            assert img.format == "PNG" and min(img.size) > 50
    assert "test accuracy</th><td>50.00%" in html
    assert "Titles give the true and predicted class" in html
    assert "over 6 image(s)" in html


def test_analyze_damaged_run_folder_skips_sections_with_notes(tmp_path: Path) -> None:
    run = make_run_folder(tmp_path / "run")
    (run / "summary.json").write_text('{"test_accuracy": 0.5, "confusion')  # killed mid-write
    (run / "curves.png").unlink()
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match="no images to analyse"):
        analyze(run, tmp_path / "out")
    html = analyze(run, tmp_path / "out", data=str(tmp_path / "tiny.npz")).read_text()
    assert "config.json is missing; summary.json could not be read" in html
    assert "the run has no curves.png" in html
    assert "summary.json has no square confusion_matrix" in html


def test_samples_take_classes_in_turn_as_the_model_sees_them() -> None:
    samples = sample_dataset("digits", create_model("vit_digits").cfg, 12)
    assert samples.labels.tolist() == [*range(10), 0, 1]
    assert samples.images.shape == (12, 1, 8, 8)
    assert samples.images.min() >= -1 and samples.images.max() <= 1
    rgb = sample_dataset("digits", create_model("vit_micro").cfg, 2)  # grey to RGB, 8 to 32 px
    assert rgb.images.shape == (2, 3, 32, 32)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_samples_of_shards_and_photo_folders_are_streamed(tmp_path: Path) -> None:
    """Shards (which ``load_dataset`` refuses) and a folder of differently sized photos with
    an unreadable file (1 of 11, under the unreadable-fraction limit) are read batch by batch,
    classes in turn, at the model's size."""
    assert main(["data", "pack", "digits", str(tmp_path / "shards")]) == 0
    cfg = create_model("vit_digits").cfg
    shards = sample_dataset(str(tmp_path / "shards"), cfg, 12)
    assert shards.labels is not None and shards.labels.tolist() == [*range(10), 0, 1]
    assert shards.images.shape == (12, 1, 8, 8)
    for label, size in enumerate([(300, 200), (120, 160)]):
        (tmp_path / "photos" / f"c{label}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", size, color=(90 * label, 40 * i, 0)).save(
                tmp_path / "photos" / f"c{label}" / f"{i}.jpg"
            )
    (tmp_path / "photos" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    photos = sample_dataset(str(tmp_path / "photos"), cfg, 3)
    assert photos.labels is not None and photos.labels.tolist() == [0, 1, 0]
    assert photos.classes == ["c0", "c1"] and photos.images.shape == (3, 1, 8, 8)
    assert [name.split(" ")[0] for name in photos.skipped] == ["c0/broken.jpg"]


def test_analyze_cli_on_a_checkpoint_with_image_files(tmp_path: Path, capsys) -> None:
    model = create_model("vit_micro", num_classes=0, classifier="gap", pos_embed="relative")
    checkpoint = model.save_pretrained(tmp_path / "model")
    files = []
    for i, size in enumerate([(40, 30), (32, 32)]):  # resized to 32x32, any mode converted
        files.append(tmp_path / f"img{i}.png")
        Image.new("L" if i else "RGB", size, color=60 * i).save(files[-1])
    out = tmp_path / "out"
    argv = ["analyze", str(checkpoint), "--images", *map(str, files), "--out", str(out)]
    assert main(argv) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert "mean over all patches (gap model)" in html
    assert "Not shown: the model&#x27;s position embedding is &#x27;relative&#x27;" in html
    assert "Not a run folder" in html
    assert (
        len(linked_images(out / "report.html")) == 2 + 3
    )  # 2 map sheets, rollout, distance, filters


def test_image_folders_are_read_file_by_file_until_enough(tmp_path: Path, caplog) -> None:
    """A folder stands for its image files (sorted, sub-folders included, other files passed
    over), each read as ``preprocess_file`` reads it alone; an unreadable one is skipped and
    logged, and reading stops once ``count`` images are in hand."""
    cfg = create_model("vit_micro").cfg
    names = ["a/0.png", "a/1.jpg", "b/0.png", "b/1.png"]
    for i, name in enumerate(names):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + 10 * i, 30), color=(50 * i, 0, 0)).save(tmp_path / "photos" / name)
    (tmp_path / "photos" / "a" / "0b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "photos" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "b" / "2.jpg").write_bytes(b"never read")
    samples = load_images([tmp_path / "photos"], cfg, count=3, max_unreadable_fraction=0.5)
    assert samples.names == ["a/0.png", "a/1.jpg", "b/0.png"]
    expected = [preprocess_file(tmp_path / "photos" / name, cfg) for name in names[:3]]
    assert torch.equal(samples.images, torch.cat(expected))
    assert "0b.jpg" in caplog.text and "2.jpg" not in caplog.text
    assert [Path(name.split(" ")[0]).name for name in samples.skipped] == ["0b.jpg"]
    with pytest.raises(ValueError, match="2 of its 6 images are unreadable"):
        load_images([tmp_path / "photos"], cfg, max_unreadable_fraction=0.2)


@pytest.mark.parametrize(
    ("flag", "count", "shown"),
    [
        ("--images", MAX_SHOWN_FILES + 1, MAX_SHOWN_FILES),  # a folder: up to the cap
        ("--data", 3, 3),  # no class folders: every image, as --images would (not 4 samples)
    ],
)
def test_analyze_cli_shows_a_folder_of_images(
    tmp_path: Path, flag: str, count: int, shown: int
) -> None:
    checkpoint = create_model("vit_micro").save_pretrained(tmp_path / "m.safetensors")
    (tmp_path / "photos").mkdir()
    for i in range(count):
        Image.new("RGB", (48, 32), color=(10 * i, 0, 0)).save(tmp_path / "photos" / f"{i}.jpg")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    argv = ["analyze", str(checkpoint), flag, str(tmp_path / "photos"), "--out", str(out)]
    assert main([*argv, "--max-unreadable-fraction", "0.5"]) == 0
    sheets = [name for name in linked_images(out / "report.html") if "maps" in name]
    assert len(sheets) == shown
    assert "Skipped 1 unreadable image file(s): " in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda ckpt, tmp: [str(ckpt)], "no images to analyse: pass --images"),
        (lambda ckpt, tmp: [str(ckpt), "--images", str(tmp)], "holds no image files"),
        (lambda ckpt, tmp: [str(ckpt), "--images", str(ckpt)], "not an image Pillow can read"),
        (lambda ckpt, tmp: [str(tmp / "nothing")], "does not exist"),
        (lambda ckpt, tmp: [str(ckpt), "--images", str(tmp / "x.png")], "image .* does not exist"),
        (lambda ckpt, tmp: [str(ckpt), "--data", str(tmp / "none")], "dataset .* does not exist"),
        (lambda ckpt, tmp: [str(ckpt), "--data", "digits", "--num-images", "0"], "at least 1"),
        (lambda ckpt, tmp: [str(ckpt), "--data", "digits", "--out", str(ckpt)], "is a file"),
    ],
)
def test_analyze_cli_bad_input(tmp_path: Path, capsys, make_args, message: str) -> None:
    checkpoint = create_model("vit_micro").save_pretrained(tmp_path / "m.safetensors")
    argv = ["analyze", "--out", str(tmp_path / "o"), *make_args(checkpoint, tmp_path)]
    assert main(argv) == 2  # a later --out in make_args wins
    assert re.search(message, capsys.readouterr().err)


def test_summary_numbers_are_formatted_for_people() -> None:
    from vitkit.analysis.report import summary_rows

    rows = dict(
        summary_rows(
            {
                "test_accuracy": 0.97823,
                "test_loss": 0.0712345,
                "best_val_accuracy": 0.5,
                "best_val_mse": None,
                "epochs": 150,
                "steps": 3300,
                "wall_seconds": 754.4,
                "images_per_second": 4016.4,
                "classes": ["0", "1"],
            }
        )
    )
    assert rows == {
        "test accuracy": "97.82%",
        "test loss": "0.07123",
        "best validation accuracy": "50.00%",
        "epochs": "150 (3300 steps)",
        "training time": "12 min 34 s",
        "training speed": "4,016 images/s",
    }
