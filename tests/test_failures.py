"""Faults a hostile newcomer makes (issue 14): each ends in one line naming what went wrong,
with exit code 1 (the system refused) or 2 (bad input), no traceback, and nothing saved lost."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from tests.conftest import dead_pid, torchrun
from vitkit import CheckpointError, create_model
from vitkit.checkpoints import export, read_checkpoint
from vitkit.cli import main
from vitkit.data.datasets import differing_classes
from vitkit.models import pretrained
from vitkit.models.pretrained import save_pretrained
from vitkit.utils import files
from vitkit.utils.files import TEMP_SUFFIX, atomic_write

REPO = Path(__file__).resolve().parents[1]


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The one line a failed command printed on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def last_line(capsys: pytest.CaptureFixture) -> str:
    """The last line a failed training command printed on stderr (log lines and the progress
    bar come before it), after checking there is no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1].split("\r")[-1]


def training_checkpoint(path: Path) -> Path:
    """vit_micro with optimizer state, as the training loop saves it."""
    model = create_model("vit_micro", num_classes=3)
    state = {"optimizer/0/exp_avg": torch.ones(3)}
    return save_pretrained(model, path, state, {"vitkit_state": json.dumps({"step": 7})})


# ---------------------------------------------------------------------- nothing saved is lost
def test_convert_of_a_training_checkpoint_names_what_it_drops(tmp_path: Path, capsys) -> None:
    src = training_checkpoint(tmp_path / "last.safetensors")
    before = src.read_bytes()
    assert main(["convert", str(src), str(src), "--to", "vitkit", "--overwrite"]) == 2
    assert "onto itself would delete them: write to another path" in error_line(capsys)
    assert src.read_bytes() == before
    assert main(["convert", str(src), str(tmp_path / "model.safetensors"), "--to", "vitkit"]) == 0
    err = capsys.readouterr().err
    assert "2 entries that are not model weights (state/optimizer/0/exp_avg, metadata " in err
    assert "vitkit_state)" in err
    assert read_checkpoint(tmp_path / "model.safetensors").dropped == []


def test_temporary_files_are_visible_and_a_killed_writers_are_removed(tmp_path: Path) -> None:
    old = time.time() - 3600
    stale = tmp_path / f"last.safetensors.{dead_pid()}-abcd1234{TEMP_SUFFIX}"
    stale_dir = tmp_path / f"hf.{dead_pid()}-abcd1234{TEMP_SUFFIX}"
    live = tmp_path / f"best.safetensors.{os.getppid()}-abcd1234{TEMP_SUFFIX}"  # pytest's parent
    recent = tmp_path / f"curves.png.{dead_pid()}-abcd1234{TEMP_SUFFIX}"  # after we started?
    lookalike = tmp_path / "notes.123-abcd1234.txt"
    for path in (stale, live, lookalike):
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    stale_dir.mkdir()
    (stale_dir / "config.json").write_text("{}")
    os.utime(stale_dir, (old, old))
    recent.write_bytes(b"x")  # modified now: could be a write on another machine in progress
    seen = []
    atomic_write(tmp_path / "out.txt", lambda tmp: seen.append(tmp.name) or tmp.write_text("ok"))
    assert seen[0].startswith(f"out.txt.{os.getpid()}-") and seen[0].endswith(TEMP_SUFFIX)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, recent.name, lookalike.name, "out.txt"])


# ------------------------------------------------------------------------- operating system
def test_full_disk_names_the_file_and_the_space_needed(tmp_path: Path, monkeypatch, capsys) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src.safetensors")
    dst = tmp_path / "out" / "dst.safetensors"
    assert main(["convert", str(src), str(dst), "--to", "vitkit"]) == 0
    before = dst.read_bytes()
    capsys.readouterr()

    def full_disk(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrained, "save_file", full_disk)
    args = ["convert", str(src), str(dst), "--to", "vitkit", "--overwrite"]
    assert main(args) == 1
    needed = sum(
        t.numel() * t.element_size() for t in create_model("vit_micro").state_dict().values()
    )
    line = error_line(capsys)
    assert line.startswith(f"vitkit convert: error: {dst}: No space left on device (it needs ")
    assert f"{needed / 1e6:,.1f} MB" in line and "MB are free there)" in line
    assert dst.read_bytes() == before and [p.name for p in dst.parent.iterdir()] == [dst.name]


def test_read_only_folder_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src.safetensors")

    def refuse(dir, prefix, suffix):  # what mkstemp meets in a read-only folder (even as root)
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    assert main(["convert", str(src), str(tmp_path / "m.npz"), "--to", "official"]) == 1
    assert error_line(capsys) == f"vitkit convert: error: {tmp_path / 'm.npz'}: Permission denied\n"


def test_a_file_where_a_folder_should_be(tmp_path: Path, capsys) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src.safetensors")
    (tmp_path / "taken").write_text("precious")
    assert main(["convert", str(src), str(tmp_path / "taken" / "m.npz"), "--to", "official"]) == 1
    assert error_line(capsys).endswith(f"{tmp_path / 'taken'}: a file, not a folder\n")
    assert main(["analyze", str(src), "--out", str(tmp_path / "taken")]) == 2
    assert f"--out {tmp_path / 'taken'} is a file: give a folder" in error_line(capsys)
    assert (tmp_path / "taken").read_text() == "precious"


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src.safetensors")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already gone
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "vitkit", "inspect", str(src)]
    result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, env=env)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (1, b"")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert exit_.value.code == 0 and capsys.readouterr().out == f"vitkit {version}\n"


# --------------------------------------------------------------------- silent wrong behaviour
def test_a_recipe_must_name_its_data(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "mnist.toml"
    recipe.write_text("model = 'vit_digits'\nlr = 0.001\n")
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert (
        error_line(capsys)
        == f"vitkit train: error: the recipe {recipe} names no data: pass --data\n"
    )
    assert not (tmp_path / "run").exists()


def two_class_data(tmp_path: Path, classes: list[str]) -> Path:
    path = tmp_path / "data.npz"
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.array([0, 1, 0, 1]), classes=np.array(classes))
    return path


def test_eval_warns_when_class_names_differ(tmp_path: Path, capsys) -> None:
    model = create_model("vit_micro", num_classes=2)
    model.cfg.extra["classes"] = ["cat", "dog"]
    model.save_pretrained(tmp_path / "m.safetensors")
    data = two_class_data(tmp_path, ["car", "ship"])
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(data)]) == 0
    err = capsys.readouterr().err
    assert "the model: [cat, dog]; the data: [car, ship]" in err
    data = two_class_data(tmp_path, ["cat", "dog"])
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(data)]) == 0
    assert "different classes" not in capsys.readouterr().err


def test_differing_classes_lists_both_sides_shortened() -> None:
    text = differing_classes(list("abc"), [str(i) for i in range(12)], "train", "test", shown=2)
    assert (
        text
        == "train and test have different classes: train: [a, b, ... (3 in all)]; test: [0, 1, ... (12 in all)]"
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--eps", "-1"], "eps must be > 0, not -1.0"),
        (["--eps", "nan"], "eps must be > 0, not nan"),
        (["--img-size", "0"], "img_size must be at least 1, not (0, 0)"),
        (["--num-classes", "-2"], "num_classes must be >= 0"),
    ],
)
def test_nonsense_overrides_are_refused(
    flag: list[str], message: str, tmp_path: Path, capsys
) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src.safetensors")
    dst = tmp_path / "dst.safetensors"
    assert main(["convert", str(src), str(dst), "--to", "vitkit", *flag]) == 2
    assert message in error_line(capsys)
    assert not dst.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("depth", 0),
        ("num_heads", 0),
        ("width", -8),
        ("mlp_dim", 0),
        ("patch_size", (0, 4)),
        ("in_chans", 0),
        ("representation_size", 0),
        ("resnet_width_factor", 0.0),
    ],
)
def test_config_sizes_must_be_positive(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field} must be"):
        vitkit.ViTConfig(**{field: value})


def test_timm_pth_export_states_what_it_does_not_keep(tmp_path: Path, caplog) -> None:
    model = create_model("vit_micro", num_classes=2)
    model.cfg.extra["classes"] = ["cat", "dog"]
    with caplog.at_level(logging.WARNING):
        export(model, tmp_path / "m.pth", "timm")
    assert (
        "needs model= (--model) for the number of heads and gives gelu 'none' instead of "
        "'tanh'; no classes metadata; write .safetensors" in caplog.text
    )
    back = vitkit.load_pretrained(tmp_path / "m.pth", "vit_micro")  # exactly as stated
    assert (back.cfg.gelu, back.cfg.extra) == ("none", {})
    export(model, tmp_path / "m.safetensors", "timm")
    back = vitkit.load_pretrained(tmp_path / "m.safetensors")
    assert back.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), model.eval()(x))


def test_official_npz_with_a_non_square_grid_takes_the_callers_img_size(tmp_path: Path) -> None:
    model = create_model("vit_micro", img_size=(32, 64)).eval()  # an 8x16 grid
    export(model, tmp_path / "wide.npz", "official")
    with np.load(tmp_path / "wide.npz") as f:  # as Google's files: no recorded config
        np.savez(tmp_path / "plain.npz", **{k: f[k] for k in f.files if k != "vitkit_config"})
    with pytest.raises(CheckpointError, match=r"128 patches, not a square grid.*pass img_size="):
        vitkit.load_pretrained(tmp_path / "plain.npz")
    back = vitkit.load_pretrained(tmp_path / "plain.npz", img_size=(32, 64))
    x = torch.randn(1, 3, 32, 64)
    assert back.cfg.img_size == (32, 64) and torch.equal(back(x), model(x))
    with pytest.raises(CheckpointError, match="not a square grid"):
        vitkit.load_pretrained(tmp_path / "plain.npz", img_size=(64, 64))  # 256 patches


# ---------------------------------------------------------------------- misleading messages
def run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    training_checkpoint(run / "best.safetensors")
    (run / "config.json").write_text(json.dumps({"data": "digits", "model": "vit_micro"}))
    (run / "metrics.jsonl").write_text("")
    return run


def test_eval_predict_inspect_accept_run_folders(tmp_path: Path, capsys) -> None:
    run = run_folder(tmp_path)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert main(["inspect", str(run)]) == 0
    assert "weights fit:  yes" in capsys.readouterr().out
    assert main(["predict", str(run), str(image), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


def test_predict_without_a_head(tmp_path: Path, capsys) -> None:
    create_model("vit_micro", num_classes=0).save_pretrained(tmp_path / "m.safetensors")
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "x.png")]) == 2
    assert "has no classification head (num_classes 0)" in error_line(capsys)


def test_predict_on_a_folder_without_images_or_a_bomb(tmp_path: Path, monkeypatch, capsys) -> None:
    create_model("vit_micro", num_classes=2).save_pretrained(tmp_path / "m.safetensors")
    assert main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path)]) == 2
    assert f"folder {tmp_path} holds no image files (by suffix: .bmp, " in error_line(capsys)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    assert main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "big.png")]) == 2
    assert "big.png is not an image Pillow can read (Image size (64 pixels)" in error_line(capsys)


def test_predict_on_a_folder_reads_every_image_under_it_in_order(tmp_path: Path, capsys) -> None:
    create_model("vit_micro", num_classes=3).save_pretrained(tmp_path / "m.safetensors")
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    files = [photos / "b.png", photos / "holiday" / "a.jpg", photos / "holiday" / "c.PNG"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(file, format="PNG")
    (photos / "holiday" / "notes.txt").write_text("not an image")
    assert main(["predict", str(tmp_path / "m.safetensors"), *map(str, files)]) == 0
    one_by_one = capsys.readouterr().out
    assert main(["predict", str(tmp_path / "m.safetensors"), str(photos)]) == 0
    assert capsys.readouterr().out == one_by_one  # sorted: b.png before the sub-folder's files
    assert [line.split(": ")[0] for line in one_by_one.splitlines()] == list(map(str, files))


def test_a_text_file_named_bin(tmp_path: Path, capsys) -> None:
    (tmp_path / "model.bin").write_text("hello\n")
    assert main(["inspect", str(tmp_path / "model.bin")]) == 2
    assert "is not a readable PyTorch file (neither a zip archive nor a pickle)" in error_line(
        capsys
    )


def test_checkpoint_npz_of_objects_never_suggests_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ck.npz"
    np.savez(
        path,
        **{
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel": np.array(
                [None], dtype=object
            )
        },
    )
    with pytest.raises(
        CheckpointError, match=r"not a readable \.npz file \(it is no zip of plain arrays"
    ) as err:
        vitkit.load_pretrained(path)
    assert "allow_pickle" not in str(err.value)


# ------------------------------------------------------------------- faults while training
def test_train_into_a_folder_it_cannot_create_is_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "locked" / "run"
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # what a read-only parent gives (root ignores chmod)
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    assert main(["train", "--epochs", "1", "--out", str(out)]) == 1
    assert last_line(capsys) == f"vitkit train: error: {out}: Permission denied"


def test_disk_full_during_training_keeps_the_last_checkpoint(
    tiny_digits: Callable[[int, int], Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    """The second epoch's checkpoint meets a full disk: the run stops with one line naming the
    file, and the first epoch's checkpoint is still there, whole."""
    out = tmp_path / "run"
    real_save = pretrained.save_file
    calls = []

    def full_on_second(tensors, filename, metadata=None) -> None:
        calls.append("last" in Path(filename).name)  # not best.safetensors, written beside it
        if sum(calls) == 2 and calls[-1]:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(pretrained, "save_file", full_on_second)
    data = str(tiny_digits(64, 16))
    args = ["train", "--data", data, "--batch-size", "32", "--epochs", "3", "--warmup-epochs", "0"]
    assert main([*args, "--out", str(out)]) == 1
    line = last_line(capsys)
    assert line.startswith(f"vitkit train: error: {out / 'last.safetensors'}: No space left")
    monkeypatch.setattr(pretrained, "save_file", real_save)
    assert read_checkpoint(out / "last.safetensors").config.num_classes == 10
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


# slow: torchrun; the one-line error: the single-process error tests
@pytest.mark.slow
def test_an_error_under_torchrun_is_printed_once(tmp_path: Path) -> None:
    """Both ranks meet the same bad option: one line from vitkit, no Python traceback."""
    command = [
        *torchrun(2),
        "-m",
        "vitkit",
        "train",
        "--batch-size",
        "99998",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("vitkit train: error: batch_size 99998 is larger") == 1, done.stderr
    assert "Traceback" not in done.stderr.split("vitkit train: error:")[0]
