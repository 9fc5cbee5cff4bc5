"""Hostile input and a hostile system: corrupt images, truncated shards, a killed pack, a full
disk, a pre-training run folder given as a checkpoint, and the noise of the ONNX exporter
(docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import SafetensorError

from tests.conftest import dead_pid
from vitkit.checkpoints import load_pretrained
from vitkit.cli import main
from vitkit.data import load_dataset
from vitkit.data.sources import DataOptions, open_source, open_splits
from vitkit.deploy.to_onnx import report_warnings
from vitkit.models import create_model, pretrained
from vitkit.models.pretrained import save_pretrained
from vitkit.utils.files import TEMP_SUFFIX


def test_finetune_from_a_pretrain_run_folder(
    tiny_digits: Callable[[int, int], Path], tmp_path: Path
) -> None:
    data = str(tiny_digits(64, 32))
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    short = ["--data", data, "--steps", "2", "--batch-size", "16", "--eval-every", "2"]
    assert main(["pretrain", *short, "--out", str(pre)]) == 0
    assert main(["finetune", "--from", str(pre), *short, "--out", str(fine)]) == 0
    assert json.loads((fine / "config.json").read_text())["model"]["init_from"] == str(pre)
    assert load_pretrained(pre).cfg.num_classes != 10  # the pre-training head (MPP)...
    assert load_pretrained(fine).cfg.num_classes == 10  # ...replaced by the digits' classes


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors fails as it does on a full disk: its own error, the OS code in the text."""

    def no_space(*args: object, **kwargs: object) -> None:
        message = "Error while serializing: I/O error: No space left on device (os error 28)"
        raise SafetensorError(message)

    monkeypatch.setattr(pretrained, "save_file", no_space)


def contents(path: Path) -> dict[Path, bytes]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {p: p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize(
    ("name", "to"), [("model.safetensors", "vitkit"), ("folder", "vitkit"), ("hf", "hf")]
)
@pytest.mark.parametrize("existing", [False, True])
def test_convert_on_a_full_disk_names_the_file_and_keeps_the_old_one(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    name: str,
    to: str,
    existing: bool,
    request: pytest.FixtureRequest,
) -> None:
    src = tmp_path / "src.safetensors"
    save_pretrained(create_model("vit_digits"), src)
    dst = tmp_path / name
    if existing:
        assert main(["convert", str(src), str(dst), "--to", to]) == 0
        before = contents(dst)
    capsys.readouterr()
    request.getfixturevalue("full_disk")
    args = ["convert", str(src), str(dst), "--to", to] + (["--overwrite"] if existing else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "MB" in err and str(dst) in err
    assert "Traceback" not in err and "SafetensorError" not in err and ".vitkit-tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["src.safetensors"] + ([name] if existing else [])
    )  # no temporary leftovers
    if existing:  # the old copy is intact
        assert contents(dst) == before


# slow: an ONNX export in a fresh process; what it filters is tested by the next test
@pytest.mark.slow
def test_onnx_export_prints_no_library_chatter(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    src = tmp_path / "model.safetensors"
    save_pretrained(create_model("vit_digits"), src)
    out = tmp_path / "m.onnx"
    command = [sys.executable, "-m", "vitkit", "export", str(src), str(out), "--to", "onnx"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=True)
    output = done.stdout + done.stderr
    assert "Replaced initializer" not in output and "Warning" not in output, output
    assert len(output.strip().splitlines()) == 2, output  # "wrote ..." and the check's line


def test_a_warning_about_the_model_stays_one_line(caplog: pytest.LogCaptureFixture) -> None:
    def caught(text: str, category: type[Warning], filename: str) -> warnings.WarningMessage:
        return warnings.WarningMessage(category(text), category, filename, 1)

    library = "/venv/lib/python3.11/site-packages/onnxscript/optimizer/x.py"
    mine = "/home/me/model.py"
    with caplog.at_level(logging.DEBUG, logger="vitkit.deploy.to_onnx"):
        report_warnings(
            [
                caught("about\n  the model", UserWarning, mine),
                caught("about\n  the model", UserWarning, mine),
                caught("internal", UserWarning, library),
                caught("deprecated", FutureWarning, "/usr/lib/python3.11/copyreg.py"),
            ]
        )
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "ONNX export: about the model"),
        (logging.DEBUG, "ONNX export: internal"),
        (logging.DEBUG, "ONNX export: deprecated"),
    ]


def test_pack_again_after_a_killed_pack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert main(["data", "pack", "digits", str(fresh), "--shard-size", "50k"]) == 0
    # what a pack killed while writing its second shard leaves: the first shard, the
    # second under its temporary name (by a process that is gone), no dataset.json
    out.mkdir()
    (out / "train-000000.tar").write_bytes((fresh / "train-000000.tar").read_bytes())
    temp = out / f"train-000001.tar.{dead_pid()}-k1ll3d{TEMP_SUFFIX}"
    temp.write_bytes(b"half a shard")
    os.utime(temp, (0, 0))
    assert main(["data", "pack", "digits", str(out), "--shard-size", "50k"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for shard in fresh.iterdir():
        assert (out / shard.name).read_bytes() == shard.read_bytes()


@pytest.mark.parametrize("stranger", ["notes.txt", "dataset.json", "live"])
def test_pack_still_refuses_a_folder_that_is_not_its_leftovers(
    tmp_path: Path, capsys: pytest.CaptureFixture, stranger: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"a shard")
    if stranger == "live":  # a pack writing there now
        stranger = f"train-000001.tar.{os.getpid()}-w0rk1ng{TEMP_SUFFIX}"
    (out / stranger).write_text("{}")
    assert main(["data", "pack", "digits", str(out)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert (out / stranger).exists() and (out / "train-000000.tar").exists()


# ---------------------------------------------------------------- unreadable images


def make_folder(
    root: Path, good: int, broken: int, classes: tuple[str, ...] = ("a", "b")
) -> set[str]:
    """``root/<class>/`` with ``good`` 8x8 PNGs and ``broken`` unreadable .png files a class
    (empty, truncated, text, in turn); returns the broken ones' names (class/file)."""
    rng = np.random.default_rng(0)
    names = set()
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(good):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"good{i}.png")
        png = (root / label / "good0.png").read_bytes()
        for i in range(broken):
            content = (b"", png[: len(png) // 2], b"just some text\n")[i % 3]
            (root / label / f"broken{i}.png").write_bytes(content)
            names.add(f"{label}/broken{i}.png")
    return names


def run_args(data: Path, out: Path, in_memory: str) -> list[str]:
    short = ["--epochs", "1", "--batch-size", "4", "--warmup-steps", "1", "--num-workers", "0"]
    model = ["--model", "vit_digits", "--img-size", "8"]
    return [
        "train",
        "--data",
        str(data),
        *model,
        *short,
        "--data-in-memory",
        in_memory,
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_every_unreadable_image_is_listed_in_the_run_folder(tmp_path: Path, in_memory: str) -> None:
    data = tmp_path / "data"
    broken = make_folder(data / "train", good=20, broken=2)  # 4 of 44: 9%, under 10%
    make_folder(data / "test", good=3, broken=0)
    out = tmp_path / "run"
    assert main(run_args(data, out, in_memory)) == 0
    lines = (out / "skipped_files.txt").read_text().splitlines()
    assert {line.split(" (")[0] for line in lines} == broken  # every one, more than 3
    assert all(line.endswith(")") and " (" in line for line in lines)  # with its reason
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == len(broken) == 4


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_a_folder_of_mostly_broken_images_stops_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, in_memory: str
) -> None:
    data = tmp_path / "data"
    make_folder(data, good=2, broken=18)
    assert main(run_args(data, tmp_path / "run", in_memory)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the first few named
    assert error.startswith("vitkit train: error: ")
    assert "unreadable, more than max_unreadable_fraction 0.1 allows" in error
    # the same policy evaluating, packing shards, and reading for fewshot / probe
    checkpoint = tmp_path / "model.safetensors"
    save_pretrained(create_model("vit_digits", num_classes=2, in_chans=3), checkpoint)
    assert main(["eval", str(checkpoint), "--data", str(data), "--split", "train"]) == 2
    assert main(["data", "pack", str(data), str(tmp_path / "shards")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 2 and all("max_unreadable_fraction 0.1" in e for e in errors)
    with pytest.raises(ValueError, match="max_unreadable_fraction"):
        load_dataset(data)
    # a higher limit lets the readable ones through
    options = DataOptions(in_memory="no", num_workers=0, max_unreadable_fraction=0.95)
    splits = open_splits(str(data), 0, 0, options)
    splits.set_image_size((8, 8))
    assert sum(len(b.labels) for b in splits.test.eval_batches(4)) <= 4


def test_every_command_that_reads_data_takes_the_limit_its_error_names(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The error says to raise --max-unreadable-fraction: eval, fewshot, probe, analyze and
    data pack take it as train does; given a run folder, the first four default to the run's
    own limit."""
    data = tmp_path / "data"
    make_folder(data, good=6, broken=2)  # 4 of 16 unreadable: 25%
    checkpoint = tmp_path / "model.safetensors"
    save_pretrained(create_model("vit_digits", num_classes=2, in_chans=3), checkpoint)
    report = tmp_path / "report"
    commands = {
        "eval": ["eval", str(checkpoint), "--data", str(data)],
        "fewshot": ["fewshot", str(checkpoint), "--data", str(data), "--shots", "1"],
        "probe": ["probe", str(checkpoint), "--data", str(data), "--max-iter", "5"],
        "analyze": ["analyze", str(checkpoint), "--data", str(data), "--out", str(report)],
        "data": ["data", "pack", str(data), str(tmp_path / "shards")],
    }
    for name, args in commands.items():
        assert main(args) == 2, name
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"vitkit {name}: error: "), error
        assert "more than max_unreadable_fraction 0.1 allows" in error
        assert "raise --max-unreadable-fraction" in error
        assert main([*args, "--max-unreadable-fraction", "0.3"]) == 0, name
    assert (report / "report.html").is_file()
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["splits"]
    # A run that allowed 30% lends its limit to the commands given its folder.
    out = tmp_path / "run"
    assert main([*run_args(data, out, "yes"), "--max-unreadable-fraction", "0.3"]) == 0
    assert main(["eval", str(out), "--data", str(data)]) == 0
    assert main(["analyze", str(out), "--data", str(data), "--out", str(report)]) == 0
    assert main(["eval", str(out), "--data", str(data), "--max-unreadable-fraction", "0.1"]) == 2


def test_a_truncated_shard_counts_and_lists_its_lost_samples(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", good=20, broken=0)
    shards = tmp_path / "shards"
    assert main(["data", "pack", str(tmp_path / "data"), str(shards), "--shard-size", "8kB"]) == 0
    index = json.loads((shards / "dataset.json").read_text())
    entries = index["splits"]["train"]["shards"]
    assert len(entries) >= 4 and entries[0]["count"] >= 2
    cut = shards / entries[0]["name"]
    with tarfile.open(cut) as tar:  # cut inside the header of the middle sample's image
        middle = tar.getmembers()[2 * (entries[0]["count"] // 2)].offset + 100
    cut.write_bytes(cut.read_bytes()[:middle])
    source = open_source(str(shards), "train", DataOptions(num_workers=0))
    source.set_image_size((8, 8))
    read = sum(len(b.labels) for b in source.eval_batches(4))
    lost = [n for n in source.skipped.skipped if n.startswith(entries[0]["name"])]
    assert 0 < len(lost) < entries[0]["count"]
    assert read + len(source.skipped.skipped) == index["splits"]["train"]["count"]
    # most shards cut: the fraction limit stops the reading
    for entry in entries[1:]:
        (shards / entry["name"]).write_bytes(b"")
    source = open_source(str(shards), "train", DataOptions(num_workers=0))
    source.set_image_size((8, 8))
    with pytest.raises(ValueError, match=r"unreadable, more than max_unreadable_fraction 0\.1"):
        sum(len(b.labels) for b in source.eval_batches(4))
