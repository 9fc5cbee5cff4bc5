"""The training loop's policies: a time budget fits the schedule, a non-finite loss is
aborted, skipped or rolled back, best.safetensors holds the model alone, a resume says where
it starts, and only torchrun's rank 0 logs."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import interrupted_after_checkpoint, run_records, torchrun
from tests.test_training import config, weights
from vitkit import load_pretrained
from vitkit.cli import main
from vitkit.data.sources import open_splits
from vitkit.models import VisionTransformer
from vitkit.training import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from vitkit.training.loop import Session
from vitkit.training.model_choice import choose_model
from vitkit.training.optim import SchedulePlan, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 256 // 32  # TINY: 320 digits, a fifth held out, batches of 32


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    return tiny_digits(320, 100)


def simulated_clock(monkeypatch: pytest.MonkeyPatch, seconds_per_step: float) -> None:
    """Every optimizer step takes ``seconds_per_step`` of training time, whatever the machine."""

    def spent(self: Session, this_segment: bool = True) -> float:
        return self.state.step * seconds_per_step

    monkeypatch.setattr(Session, "spent_seconds", spent)


def poison_forward(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """The model's training forward passes number ``bad_calls`` (1-based) return NaN."""
    forward = VisionTransformer.forward
    calls = []

    def poisoned(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            calls.append(1)
            if len(calls) in bad_calls:
                return forward(self, x) * float("nan")
        return forward(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", poisoned)


# ------------------------------------------------------------------ the time budget


def test_a_refit_plan_never_jumps_and_ends_at_zero() -> None:
    plan = SchedulePlan(30, 1000, "cosine")
    factors = []
    while len(factors) < plan.total_steps:
        step = len(factors)
        if step in (5, 40):  # cut to 60 steps, then to 50
            plan.refit(step, 60 if step == 5 else 50, 2)
        factors.append(plan(step))
    assert len(factors) == 50
    peak = factors.index(1.0)
    decay = factors[peak:]
    assert all(b <= a for a, b in pairwise(decay))  # never up
    # The refit at step 40 continues the decay where it was: no step down bigger than the
    # steepest step of the decay before it.
    steepest = max(a - b for a, b in pairwise(decay[:35]))
    assert factors[39] - factors[40] <= 2 * steepest
    assert plan(plan.total_steps) == pytest.approx(0.0, abs=1e-12)
    # Refitting to the same plan changes nothing.
    same = SchedulePlan(10, 100, "cosine")
    for step in (3, 20, 50):
        same.refit(step, 100, 10)
    assert [same(s) for s in range(50, 100)] == pytest.approx(
        [lr_factor(s, 10, 100, "cosine") for s in range(50, 100)]
    )


def test_a_time_boxed_run_ends_as_a_finished_run(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulated_clock(monkeypatch, 0.1)  # 0.03 minutes: about 18 of the 40 configured steps
    cfg = config(tiny_data, tmp_path / "run", epochs=5, max_minutes=0.03, warmup_epochs=2.0)
    summary = train(cfg)
    plan = summary["schedule"]
    assert summary["budget_spent"] and 15 <= summary["steps"] <= 19
    assert plan["total_steps"] == summary["steps"] and plan["configured_steps"] == 40
    assert plan["refits"][0]["reason"] == "fitted to the time budget"
    assert plan["refits"][0]["seconds_per_step"] == pytest.approx(0.1)
    # The warm-up shrank with the run: 16 of 40 steps -> two fifths of the fitted run.
    assert plan["warmup_steps"] == round(16 * plan["refits"][0]["total_steps"] / 40)
    lrs = [r["lr"] for r in run_records(tmp_path / "run")]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9 * cfg.lr)  # the schedule's end value
    after_peak = lrs[lrs.index(max(lrs)) :]
    assert all(b <= a for a, b in pairwise(after_peak))


def test_a_time_boxed_run_resumes_its_plan_exactly(
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulated_clock(monkeypatch, 0.1)
    settings = dict(epochs=5, max_minutes=0.03, warmup_epochs=1.0)
    whole = train(config(tiny_data, tmp_path / "whole", **settings))

    # killed right after the first epoch's checkpoint
    with interrupted_after_checkpoint(1), pytest.raises(TrainingInterrupted):
        train(config(tiny_data, tmp_path / "cut", **settings))
    with caplog.at_level(logging.INFO, logger="vitkit.training.loop"):
        resumed = train(resume=tmp_path / "cut")
    assert resumed["schedule"] == whole["schedule"]
    assert resumed["steps"] == whole["steps"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert said == [f"resuming {tmp_path / 'cut'} at step 8 of {planned_at(whole, 8)}, epoch 1"]
    a, b = weights(tmp_path / "whole/last.safetensors"), weights(tmp_path / "cut/last.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def planned_at(summary: dict, step: int) -> int:
    """The run's planned length after ``step`` steps: the last refit made by then."""
    return [r["total_steps"] for r in summary["schedule"]["refits"] if r["step"] <= step][-1]


# ---------------------------------------------------------------- non-finite losses


def test_abort_names_the_step_the_checkpoint_and_the_resume_command(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_forward(monkeypatch, {12})  # step 12, in the 2nd epoch
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(config(tiny_data, out))
    message = str(caught.value)
    assert "nan at step 12" in message and "(step 8, epoch 1)" in message
    assert f"vitkit train --resume {out} --on-nonfinite rollback" in message
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events == [
        dict(event="nonfinite", step=12, loss="nan", policy="abort", action="aborted")
    ]


def test_skip_drops_the_step_and_gives_up_after_the_limit(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_forward(monkeypatch, {5, 13})
    summary = train(config(tiny_data, tmp_path / "skip", on_nonfinite="skip"))
    assert summary["steps"] == 3 * STEPS_PER_EPOCH  # the run kept its length
    assert [(e["step"], e["action"]) for e in summary["nonfinite_events"]] == [
        (5, "skipped"),
        (13, "skipped"),
    ]
    records = run_records(tmp_path / "skip")
    # A skipped step is not averaged in: its line (one a step here) has no loss.
    assert [r["step"] for r in records if "loss" not in r] == [5, 13]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    model = load_pretrained(tmp_path / "skip/best.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # With the limit at 1, the second NaN aborts.
    poison_forward(monkeypatch, {5, 13})
    with pytest.raises(TrainingDiverged, match="nan at step 13"):
        train(config(tiny_data, tmp_path / "limit", on_nonfinite="skip", max_skipped_steps=1))
    events = (tmp_path / "limit/events.jsonl").read_text().splitlines()
    assert [json.loads(e)["action"] for e in events] == ["skipped", "aborted"]


def test_rollback_reloads_the_last_checkpoint_at_half_the_learning_rate(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_forward(monkeypatch, {12})  # once: the replayed step 12 is finite
    cfg = config(tiny_data, tmp_path / "run", on_nonfinite="rollback")
    summary = train(cfg)
    total = 3 * STEPS_PER_EPOCH
    assert summary["steps"] == total
    [event] = summary["nonfinite_events"]
    assert (event["step"], event["action"], event["resumed_at"], event["lr_scale"]) == (
        12,
        "rolled back",
        8,
        0.5,
    )
    assert summary["schedule"]["lr_scale"] == 0.5
    records = {r["step"]: r for r in run_records(tmp_path / "run")}
    assert sorted(records) == list(range(1, total + 1))  # steps 9-11 logged once
    # ``lr`` is logged after the step: the learning rate of the next one.
    for step in (4, 8):
        assert records[step]["lr"] == pytest.approx(cfg.lr * lr_factor(step, 8, total, "cosine"))
    for step in (9, 20):
        expected = 0.5 * cfg.lr * lr_factor(step, 8, total, "cosine")
        assert records[step]["lr"] == pytest.approx(expected)


def test_rollback_without_a_checkpoint_aborts(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_forward(monkeypatch, {3})
    with pytest.raises(TrainingDiverged, match="nan at step 3, before the first checkpoint"):
        train(config(tiny_data, tmp_path / "run", on_nonfinite="rollback"))


# --------------------------------------------------------------------- checkpoints


def tensor_bytes(path: Path) -> dict[str, int]:
    return {k: t.numel() * t.element_size() for k, t in weights(path).items()}


def test_best_holds_the_model_and_old_bests_still_load(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    train(config(tiny_data, out))
    model = load_pretrained(out / "best.safetensors")
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(tensor_bytes(out / "best.safetensors").values()) == weight_bytes
    assert (out / "best.safetensors").stat().st_size < 1.1 * weight_bytes + 20_000
    # + the optimizer's buffers: at least one per weight (Muon's momentum, Adam's two moments)
    assert (out / "last.safetensors").stat().st_size > 2 * weight_bytes

    # A run folder of the previous version: best.safetensors carried the training state.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    shutil.copyfile(old / "last.safetensors", old / "best.safetensors")
    assert any(k.startswith("state/optimizer/") for k in tensor_bytes(old / "best.safetensors"))
    loaded = load_pretrained(old / "best.safetensors")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights(old / "last.safetensors")[name])
    assert main(["eval", str(old / "best.safetensors"), "--data", str(tiny_data)]) == 0
    assert "/100)" in capsys.readouterr().out
    tuned = main(
        [
            "finetune",
            "--from",
            str(old / "best.safetensors"),
            "--data",
            str(tiny_data),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    assert tuned == 0


# ------------------------------------------------------------------------- logging


# slow: test_under_torchrun_every_rank_rolls_back_and_rank_0_logs_once counts the lines of both
@pytest.mark.slow
@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_logs_under_torchrun(tiny_data: Path, tmp_path: Path, rank: str) -> None:
    """A worker of rank 1 (torchrun sets RANK; without MASTER_ADDR the process trains alone)
    logs errors only, where rank 0 logs its info lines."""
    env = {**os.environ, "RANK": rank, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "vitkit",
        "train",
        "--data",
        str(tiny_data),
        "--steps",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("training 136,138-parameter" in done.stderr) == (rank == "0"), done.stderr[-3000:]


# ------------------------------------------------------------------- model choice


def photo_folder(root: Path, per_class: int = 5, size: tuple[int, int] = (120, 90)) -> Path:
    """A phone-photo-like folder, small: two classes of colour JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")
    return root


def npz_of(path: Path, shape: tuple[int, ...]) -> Path:
    images = np.zeros((20, *shape), dtype=np.uint8)
    labels = np.arange(20) % 2
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    return path


@pytest.mark.parametrize(
    ("shape", "model"),
    [((8, 8), "vit_digits"), ((28, 28), "vit_mnist"), ((32, 32, 3), "vit_cifar")],
)
def test_without_a_model_the_data_chooses_one(tmp_path: Path, shape: tuple, model: str) -> None:
    data = str(npz_of(tmp_path / "data.npz", shape))
    assert choose_model(data, open_splits(data, 0.0, 0).train).model == model


def test_photos_train_a_photo_model_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photos = photo_folder(tmp_path / "photos")
    with caplog.at_level(logging.INFO):
        code = main(
            [
                "train",
                "--data",
                str(photos),
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    assert code == 0
    cfg = json.loads((tmp_path / "run/config.json").read_text())
    assert (cfg["model"]["name"], cfg["model"]["img_size"]) == ("vit_ti16", 96)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no --model")]
    assert said == [
        "no --model given: vit_ti16 at 96 px for 8 colour images of about 90 px: photos, for "
        "ViT-Ti/16 (the smallest of the paper's family) at 96 px for so few images (--model "
        "chooses another)"
    ]
    # A config that names a model keeps it.
    assert (
        main(
            [
                "train",
                "--data",
                str(photos),
                "--model",
                "vit_micro",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "named"),
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "named/config.json").read_text())
    assert saved["model"]["name"] == "vit_micro"


@pytest.mark.parametrize(("accum", "batch"), [(1, 8), (3, 6)])
def test_a_folder_smaller_than_the_default_batch_trains_with_all_its_images(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    accum: int,
    batch: int,
) -> None:
    photos = photo_folder(tmp_path / "photos")  # 10 images, 8 of them for training
    args = ["train", "--data", str(photos), "--model", "vit_micro", "--steps", "1"]
    with caplog.at_level(logging.INFO):
        code = main([*args, "--accum-steps", str(accum), "--out", str(tmp_path / "run")])
    assert code == 0
    # The largest batch of whole micro-batches that 8 images fill: 8, or 2 x 3 with 3 steps.
    assert json.loads((tmp_path / "run/config.json").read_text())["optim"]["batch_size"] == batch
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch size")]
    assert said == [
        f"batch size {batch}: the default 128 is more than the 8 training images "
        "(--batch-size sets another)"
    ]
    # A batch given explicitly is kept, and refused when the images cannot fill it.
    assert main([*args, "--batch-size", "9", "--out", str(tmp_path / "explicit")]) == 2
    assert "batch_size 9 is larger than the 8 training images" in capsys.readouterr().err


def test_shards_without_a_model_are_refused_with_the_choices(tmp_path: Path) -> None:
    assert main(["data", "pack", str(npz_of(tmp_path / "d.npz", (8, 8))), str(tmp_path / "s")]) == 0
    with pytest.raises(
        ValueError, match=r"choose one, --model vit_digits .*vit_ti16 --img-size 96"
    ):
        train(TrainConfig.from_dict(dict(data=str(tmp_path / "s"), out=str(tmp_path / "run"))))


def test_finetuning_says_its_resolution(
    tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(config(tiny_data, tmp_path / "digits", epochs=1))
    photos = photo_folder(tmp_path / "photos")
    with caplog.at_level(logging.INFO):
        code = main(
            [
                "finetune",
                "--from",
                str(tmp_path / "digits/best.safetensors"),
                "--data",
                str(photos),
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "ft"),
            ]
        )
    assert code == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning")]
    assert said == [
        "fine-tuning at the checkpoint's resolution, 8x8 px (the images are about 90 px); "
        "--img-size sets another (higher resizes the position embeddings): at 8 px most of "
        "the images' detail is lost"
    ]


# ------------------------------------------------------------------------ torchrun

# A torchrun worker whose model returns NaN on rank 1 only, at its N-th training forward pass.
POISON_RANK_1 = r"""
import os, sys
import torch
from vitkit.cli import main
from vitkit.models import VisionTransformer

bad_call, calls, forward = int(sys.argv[1]), [], VisionTransformer.forward

def poisoned(self, x):
    if self.training and os.environ["RANK"] == "1":
        calls.append(1)
        if len(calls) == bad_call:
            return forward(self, x) * float("nan")
    return forward(self, x)

VisionTransformer.forward = poisoned
sys.exit(main(sys.argv[2:]))
"""


# slow: torchrun; the rollback itself: test_rollback_reloads_the_last_checkpoint_at_half_the_learning_rate
@pytest.mark.slow
def test_under_torchrun_every_rank_rolls_back_and_rank_0_logs_once(
    tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    command = [
        *torchrun(2),
        "--no-python",
        sys.executable,
        "-c",
        POISON_RANK_1,
        "12",
        "train",
        "--data",
        str(tiny_data),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--val-fraction",
        "0.2",
        "--warmup-epochs",
        "1",
        "--on-nonfinite",
        "rollback",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["step"], e["action"]) for e in summary["nonfinite_events"]] == [(12, "rolled back")]
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["processes"] == 2
    assert done.stderr.count("training 136,138-parameter") == 1, done.stderr[-5000:]
    # Rank 0's own loss was finite: the NaN came with rank 1's gradients.
    assert done.stderr.count("the gradients became non-finite (the loss here: ") == 1
    assert done.stderr.count("at step 12: rolled back") == 1
