"""Hugging Face ``datasets`` as ``--data``: save_to_disk folders, parquet files and
``hf:NAME`` from a prepared offline cache, against the pixel arrays the test wrote."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vitkit.cli import main
from vitkit.data import load_dataset
from vitkit.data.hf_datasets import hub_name, is_hf_data
from vitkit.data.sources import DataOptions, InMemorySource, open_source, open_splits
from vitkit.models.vit import VisionTransformer

datasets = pytest.importorskip("datasets")

NAMES = ["zero", "one", "two"]  # ClassLabel names: not vitkit's digit names "0", "1", "2"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets``' cache inside the test's folder, offline (a child process gets both
    through the environment, this one through ``datasets.config``)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def digit_arrays(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 8, 8) uint8 grey digits 0-2 of vitkit's digits and their labels: the
    reference the pixels read back are compared with."""
    digits = load_dataset("digits", "train")
    keep = torch.nonzero(digits.labels < 3).flatten()[start : start + count]
    return digits.images[keep, 0].numpy(), digits.labels[keep].numpy()


def as_dataset(images: np.ndarray, labels: np.ndarray, **extra: list[int]) -> Any:
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}
    features.update({name: datasets.Value("int64") for name in extra})
    rows = {"image": list(images), "label": labels.tolist(), **extra}
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


@pytest.fixture
def arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": digit_arrays(0, 30), "test": digit_arrays(30, 12)}


@pytest.fixture
def saved(tmp_path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    splits = {name: as_dataset(*pair) for name, pair in arrays.items()}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def write_parquet(folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    folder.mkdir(parents=True)
    for name, pair in arrays.items():
        as_dataset(*pair).to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    return folder


def test_detects_hugging_face_data_without_importing_it(tmp_path: Path, saved: Path) -> None:
    assert is_hf_data(str(saved)) and is_hf_data("hf:org/name")
    assert not is_hf_data("digits") and not is_hf_data(str(tmp_path / "missing"))
    assert hub_name("hf:org/name:cfg") == ("org/name", "cfg")
    assert hub_name("hf:name") == ("name", None)
    with pytest.raises(ValueError, match="names no dataset"):
        hub_name("hf:")


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet folder", "hub layout", "file"])
def test_reads_the_images_labels_and_class_names_written(
    tmp_path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], layout: str
) -> None:
    if layout == "save_to_disk":
        datasets.DatasetDict({k: as_dataset(*v) for k, v in arrays.items()}).save_to_disk(
            str(tmp_path / "d")
        )
        data = tmp_path / "d"
    elif layout == "parquet folder":
        data = write_parquet(tmp_path / "d", arrays)
    elif layout == "hub layout":
        data = write_parquet(tmp_path / "d" / "data", arrays).parent
    else:  # one parquet file: a single split, so the test split is held out of it
        data = tmp_path / "d.parquet"
        as_dataset(*arrays["train"]).to_parquet(str(data))
    splits = open_splits(str(data), 0.0, 0, DataOptions(in_memory="yes"))
    assert isinstance(splits.test, InMemorySource)
    assert splits.train.info.classes == NAMES and splits.train.info.channels == 1
    if layout == "file":
        assert splits.held_out_test and len(splits.train) + len(splits.test) == 30
        return
    images, labels = arrays["test"]
    assert not splits.held_out_test
    assert np.array_equal(splits.test.dataset.images[:, 0].numpy(), images)
    assert np.array_equal(splits.test.dataset.labels.numpy(), labels)


def test_streamed_rows_give_the_in_memory_batches(saved: Path) -> None:
    memory = open_source(str(saved), "test", DataOptions(in_memory="yes"))
    streamed = open_source(str(saved), "test", DataOptions(in_memory="no", num_workers=1))
    assert type(streamed).__name__ == "StreamingRowSource"
    for source in (memory, streamed):
        source.set_image_size((8, 8))
    for a, b in zip(memory.eval_batches(5), streamed.eval_batches(5), strict=True):
        assert b.cropped and b.images.shape[1] == 3  # streamed images are always RGB
        assert torch.equal(b.images, a.images.expand(-1, 3, -1, -1))
        assert a.labels is not None and b.labels is not None
        assert torch.equal(a.labels, b.labels)


def test_a_validation_split_is_the_runs_validation(
    tmp_path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    splits = {k: as_dataset(*v) for k, v in arrays.items()}
    splits["validation"] = as_dataset(*digit_arrays(50, 7))
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "d"))
    for in_memory in ("yes", "no"):
        opened = open_splits(str(tmp_path / "d"), 0.1, 0, DataOptions(in_memory=in_memory))
        assert opened.val is not None
        assert (len(opened.train), len(opened.val), len(opened.test)) == (30, 7, 12)


def test_the_label_column_is_named_when_two_integer_columns_could_be_it(
    tmp_path: Path,
) -> None:
    images, labels = digit_arrays(0, 12)
    rows = {"image": list(images), "digit": labels.tolist(), "rotation": [0, 1] * 6}
    features = {
        "image": datasets.Image(),
        "digit": datasets.Value("int64"),
        "rotation": datasets.Value("int64"),
    }
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    dataset.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(
        ValueError, match=r"several label columns \['digit', 'rotation'\].*--label-column"
    ):
        open_source(str(tmp_path / "d"), "train")
    source = open_source(str(tmp_path / "d"), "train", DataOptions(label_column="rotation"))
    assert isinstance(source, InMemorySource) and source.info.classes == ["0", "1"]
    assert source.dataset.labels.tolist() == [0, 1] * 6


def test_a_missing_image_column_is_a_clear_error(tmp_path: Path) -> None:
    rows = {"pixels": [[0, 1]] * 4, "label": [0, 1, 0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"has no Image column .*--image-column"):
        open_source(str(tmp_path / "d"), "train")
    with pytest.raises(
        ValueError, match=r"no column 'img' for the images: .*\['pixels', 'label'\]"
    ):
        open_source(str(tmp_path / "d"), "train", DataOptions(image_column="img"))


def test_without_the_datasets_package_the_error_names_the_extra(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'vitkit\[hf\]'"):
        open_source(str(saved), "train")


def test_an_uncached_hub_dataset_offline_is_one_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"could not load the Hugging Face dataset 'nobody/none'.*HF_HUB_OFFLINE"
    ):
        open_source("hf:nobody/none", "train")


def hub_cache(cache: Path, repo: str, parquet: Path) -> None:
    """What ``load_dataset(repo)`` leaves in ``cache`` once it has fetched a parquet
    repository: its Arrow files under ``namespace___name/default/0.0.0/<hash>``, which an
    offline ``load_dataset`` finds without the Hub."""
    namespace, name = repo.split("/")
    files = {split: str(parquet / f"{split}-00000-of-00001.parquet") for split in ("train", "test")}
    builder = datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(cache))
    builder.download_and_prepare()
    target = cache / f"{namespace}___{name}" / "default" / "0.0.0" / "0a1b2c"
    shutil.move(builder.cache_dir, target)
    for arrow in target.glob("parquet-*.arrow"):  # the files are named after the dataset
        arrow.rename(target / arrow.name.replace("parquet-", f"{name}-", 1))


def test_train_and_eval_read_a_hub_dataset_from_the_cache(
    tmp_path: Path,
    datasets_cache: Path,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    capsys: pytest.CaptureFixture,
) -> None:
    hub_cache(datasets_cache, "vitkit-test/digits", write_parquet(tmp_path / "pq", arrays))
    data, run = "hf:vitkit-test/digits", tmp_path / "run"
    argv = ["train", "--data", data, "--model", "vit_micro", "--img-size", "8", "--steps", "3"]
    assert main([*argv, "--batch-size", "8", "--out", str(run), "--device", "cpu"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == NAMES
    capsys.readouterr()
    assert main(["eval", str(run), "--data", data, "--device", "cpu"]) == 0
    evaluated = capsys.readouterr().out
    assert re.search(r"accuracy [\d.]+ \(\d+/12\)", evaluated)  # the 12 test rows
    assert "zero  one  two" in evaluated  # the confusion matrix names the classes


@pytest.mark.parametrize("command", [["fewshot", "--shots", "2", "--seeds", "1"], ["probe"]])
def test_fewshot_and_probe_fit_on_train_and_score_on_test(
    saved: Path, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, in_chans=1
    )
    checkpoint = model.save_pretrained(tmp_path / "random_vit")
    name, *flags = command
    argv = [name, str(checkpoint), "--data", str(saved), *flags, "--json", "--device", "cpu"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_images"] == 30 and out["test_images"] == 12  # the dataset's own splits


def test_train_streams_a_saved_dataset_by_row(saved: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(saved), "--model", "vit_micro", "--steps", "3"]
    flags = ["--data-in-memory", "no", "--num-workers", "1", "--batch-size", "8"]
    assert main([*argv, *flags, "--out", str(run), "--device", "cpu"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == NAMES


def test_data_pack_copies_the_stored_images_into_shards(
    saved: Path, tmp_path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    assert main(["data", "pack", str(saved), str(tmp_path / "shards")]) == 0
    shards = open_source(str(tmp_path / "shards"), "test", DataOptions(num_workers=0))
    shards.set_image_size((8, 8))
    images = torch.cat([batch.images for batch in shards.eval_batches(64)])
    assert sorted(images[:, 0].flatten(1).tolist()) == sorted(
        arrays["test"][0].reshape(len(images), -1).tolist()
    )


def test_eval_of_a_run_reads_the_label_column_it_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, labels = digit_arrays(0, 24)
    rows = {"image": list(images), "digit": labels.tolist(), "parity": (labels % 2).tolist()}
    features = {"image": datasets.Image()} | {
        c: datasets.Value("int64") for c in rows if c != "image"
    }
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    dataset.save_to_disk(str(tmp_path / "d"))
    run, data = tmp_path / "run", str(tmp_path / "d")
    argv = ["train", "--data", data, "--label-column", "parity", "--model", "vit_micro"]
    assert main([*argv, "--steps", "2", "--batch-size", "8", "--out", str(run)]) == 0
    capsys.readouterr()
    # without the run's label column, two integer columns would be a question
    assert main(["eval", str(run), "--data", data, "--device", "cpu"]) == 0
    assert "(test): accuracy" in capsys.readouterr().out


def test_a_single_split_holds_out_the_same_test_rows_streamed_or_in_memory(
    tmp_path: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    as_dataset(*arrays["train"]).save_to_disk(str(tmp_path / "one"))  # a Dataset: one split
    memory, streamed = (
        open_splits(str(tmp_path / "one"), 0.0, 3, DataOptions(in_memory=m, num_workers=0))
        for m in ("yes", "no")
    )
    assert memory.held_out_test and streamed.held_out_test
    for splits in (memory, streamed):
        splits.set_image_size((8, 8))
    held_out = [
        torch.cat([b.images[:, :1] for b in s.test.eval_batches(64)]) for s in (memory, streamed)
    ]
    assert len(held_out[0]) == 6 and torch.equal(held_out[0], held_out[1])
