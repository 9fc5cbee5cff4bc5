"""The MPP transfer study's parts (``vitkit.experiments.mpp_transfer``): its label fractions,
its time-boxed runs (the training loop's budget, not a calibration of its own), its figure and
its refusals, and the whole study in miniature: killed, continued and read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from vitkit.data import load_dataset
from vitkit.experiments import mpp_transfer, runs
from vitkit.experiments.mpp_transfer import (
    FEWSHOT_FOLDERS,
    SHOTS,
    MppTransferStudy,
    labelled_subset,
    run_mpp_transfer,
    study_splits,
    time_boxed,
    transfer_figure,
)
from vitkit.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_label_fraction_takes_the_same_number_of_each_class() -> None:
    digits = load_dataset("digits", "train")
    subset = labelled_subset(digits, 0.1, seed=0)
    per_class = round(0.1 * len(digits) / 10)
    assert torch.bincount(subset.labels, minlength=10).tolist() == [per_class] * 10
    assert labelled_subset(digits, 1.0, seed=0) is digits
    # At least one image of each class, however small the fraction.
    assert torch.bincount(labelled_subset(digits, 1e-6, seed=0).labels).tolist() == [1] * 10


def test_a_subset_check_draws_its_test_images_from_every_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def listed_class_by_class(data: str, split: str):  # as an image folder lists them
        images = load_dataset("digits", split)
        return images.subset(torch.argsort(images.labels, stable=True))

    monkeypatch.setattr(mpp_transfer, "load_dataset", listed_class_by_class)
    train_set, test_set = study_splits("a folder", 50)
    assert len(train_set) == len(test_set) == 50
    # The first 50 of about 36 a class would hold two classes.
    assert len(set(test_set.labels.tolist())) >= 8
    assert len(set(train_set.labels.tolist())) >= 8


def test_a_time_boxed_run_is_stopped_by_the_loops_budget(tmp_path: Path) -> None:
    given = {"model": {"name": "vit_digits"}, "optim": {"batch_size": 4096}}
    values = time_boxed(given, 0.002, 100)
    assert values["optim"]["batch_size"] == 100  # cut to the data
    run = {"log_every": 1, "out": str(tmp_path / "run")}
    summary = train(TrainConfig.from_nested({**values, "run": run}))
    schedule = json.loads((tmp_path / "run/config.json").read_text())["schedule"]
    assert (schedule["max_minutes"], schedule["steps"]) == (0.002, 0)
    assert summary["budget_spent"] and summary["epochs"] < schedule["epochs"]


def test_the_figure_is_a_figure_of_its_own() -> None:
    score = {str(s): {"mean": 0.5, "std": 0.1} for s in SHOTS}
    row = {"test_accuracy": 0.6, "epochs": 1, "minutes": 0.1}
    results = dict(
        model="vit_digits",
        data="digits",
        minutes=1.0,
        fewshot={name: score for name in ("random init", "MPP", "supervised")},
        finetune=[dict(fraction=f, images=10, mpp=row, scratch=row) for f in (0.01, 0.1, 1.0)],
    )
    fig = transfer_figure(results)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.axes[1].get_xscale() == "log"


def test_the_study_refuses_a_budget_of_nothing_and_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--minutes and --finetune-minutes must be positive"):
        MppTransferStudy("digits", tmp_path, minutes=0)
    with pytest.raises(ValueError, match="does not exist: set VITKIT_DATA or pass --data"):
        MppTransferStudy(str(tmp_path / "nowhere"), tmp_path)


def test_settings_name_a_file_or_folder_by_what_it_is_not_how_it_is_spelled(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    saved = {"data": str(tmp_path / "a"), "seed": 0}
    assert runs.differing_settings(saved, {"data": str(tmp_path / "link"), "seed": 0}) == ""
    other = runs.differing_settings(saved, {"data": str(tmp_path / "b"), "seed": 0})
    assert other == f"data: {str(tmp_path / 'a')!r} there, {str(tmp_path / 'b')!r} now"
    assert runs.differing_settings({"data": "gone"}, {"data": "also gone"}) != ""


def test_the_study_killed_continues_and_a_finished_one_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def study(subset: int = 400) -> MppTransferStudy:
        return MppTransferStudy(
            "digits", tmp_path, "vit_digits", minutes=0.005, finetune_minutes=0.005, subset=subset
        )

    trained: list[str] = []

    def killed_at_the_third_run(cfg: TrainConfig | None = None, **kwargs: object) -> dict:
        trained.append(Path(cfg.run.out).name if cfg else "resumed")
        if len(trained) == 3:
            raise KeyboardInterrupt  # the first fine-tune, before its first step
        return train(cfg, **kwargs)

    scored: list[int] = []
    fewshot = mpp_transfer.fewshot
    monkeypatch.setattr(mpp_transfer, "fewshot", lambda *a: (scored.append(1), fewshot(*a))[1])
    monkeypatch.setattr(runs, "train", killed_at_the_third_run)
    with pytest.raises(KeyboardInterrupt):
        run_mpp_transfer(study())
    assert trained == ["mpp", "supervised", "finetune-0.01"]
    assert len(scored) == 3  # random init, MPP, supervised: before the fine-tunes

    trained.clear()
    scored.clear()
    monkeypatch.setattr(
        runs, "train", lambda cfg, **kw: (trained.append(cfg.run.out), train(cfg))[1]
    )
    results = run_mpp_transfer(study())
    # The pre-trained and supervised runs are read back; the six runs after the kill train.
    assert [Path(out).name for out in trained] == [
        f"{kind}-{fraction}"
        for fraction in ("0.01", "0.1", "1")
        for kind in ("finetune", "scratch")
    ]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert not scored  # the few-shot scores were kept, and read back
    kept = {
        name: json.loads((tmp_path / folder / runs.FEWSHOT_FILE).read_text())
        for name, folder in FEWSHOT_FOLDERS.items()
    }
    assert results["fewshot"] == kept and set(kept["MPP"]) == {str(s) for s in SHOTS}
    minutes = json.loads((tmp_path / "mpp/summary.json").read_text())["wall_seconds"] / 60
    assert results["mpp"]["minutes"] == pytest.approx(minutes)

    monkeypatch.setattr(runs, "train", lambda *a, **k: pytest.fail("a finished run retrained"))
    assert run_mpp_transfer(study()) == results
    # --out spelled relatively names the same study and the same runs.
    monkeypatch.chdir(tmp_path.parent)
    relative = MppTransferStudy(
        "digits",
        Path(tmp_path.name),
        "vit_digits",
        minutes=0.005,
        finetune_minutes=0.005,
        subset=400,
    )
    assert run_mpp_transfer(relative) == results
    with pytest.raises(ValueError, match=r"other settings \(subset: 400 there, 500 now\)"):
        run_mpp_transfer(study(subset=500))

    # A run folder deleted to train it again takes its few-shot scores with it.
    shutil.rmtree(tmp_path / "mpp")
    monkeypatch.setattr(runs, "train", train)
    run_mpp_transfer(study())
    assert len(scored) == 1
