"""The training engine: tasks, evaluators, data sources, loop state, mid-epoch checkpoints.

A second task (regressing each image's mean colour) trains through the same loop as
classification, registered here, with no change to the loop: the proof that tasks plug in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tests.conftest import interrupted_after_checkpoint, sigkill_after_checkpoint, train_config
from tests.conftest import run_records as records
from vitkit.cli import main
from vitkit.data import ImageDataset, load_dataset, to_model_input
from vitkit.data.sources import Batch, DataSource, InMemorySource, SourceInfo
from vitkit.models import create_model
from vitkit.training import LoopState, TrainConfig, TrainingInterrupted, train
from vitkit.training import loop as loop_module
from vitkit.training import run as run_module
from vitkit.training.distributed import Process
from vitkit.training.tasks import TASKS, StepResult, Task, register_task

TINY = dict(
    epochs=3,
    batch_size=32,
    lr=3e-3,
    warmup_epochs=1.0,
    log_every=1,
    augment=dict(random_resized_crop=False),
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    """256 training and 64 test digits (8 steps of 32 per epoch)."""
    return tiny_digits(256, 64)


config = partial(train_config, TINY)


def same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


# ------------------------------------------------------------------- a second task


class MeanColour(Task):
    """Regress each image's mean pixel value (on the model's [-1, 1] scale) per channel."""

    name = "mean_colour"
    best_metric = "mse"
    best_mode = "min"
    needs_labels = False

    def build_model(self, info: SourceInfo) -> nn.Module:
        model = self.cfg.model.name
        return create_model(model, num_classes=info.channels, in_chans=info.channels)

    def prepare(self, batch: Batch, seed: int) -> tuple[torch.Tensor, Any]:
        inputs = to_model_input(batch.images)
        return inputs, inputs.mean(dim=(2, 3))

    def step(self, net: nn.Module, inputs: torch.Tensor, targets: Any) -> StepResult:
        loss = F.mse_loss(net(inputs).float(), targets)
        return StepResult(loss, {"mse": loss.detach() * len(inputs)}, len(inputs))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, source: DataSource, process: Process) -> dict[str, Any]:
        total, count = 0.0, 0
        for batch in source.eval_batches(64, rank=process.rank, world_size=process.world_size):
            inputs = to_model_input(batch.images)
            total += F.mse_loss(model(inputs), inputs.mean(dim=(2, 3)), reduction="sum").item()
            count += len(inputs)
        return {"mse": total / count}


@pytest.fixture
def mean_colour_task() -> Iterator[None]:
    register_task(MeanColour)
    yield
    del TASKS[MeanColour.name]


def test_a_second_task_trains_through_the_same_loop(
    mean_colour_task: None, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mean"
    summary = train(config(tiny_data, out, task="mean_colour", val_fraction=0.25, epochs=4))
    train_lines = records(out)
    assert train_lines[-1]["mse"] < 0.5 * train_lines[0]["mse"]
    val = records(out, "val")
    assert [r["step"] for r in val] == [6, 12, 18, 24]  # 192 images: 6 steps an epoch
    best = min(val, key=lambda r: r["mse"])
    assert summary["best_val_mse"] == pytest.approx(best["mse"])
    assert summary["best_step"] == best["step"]
    # The test metric is computed from the best checkpoint: recompute it independently.
    model = create_model("vit_digits", num_classes=1, in_chans=1)
    model.load_state_dict(
        {
            k: v
            for k, v in load_file(str(out / "best.safetensors")).items()
            if not k.startswith("state/")
        }
    )
    images = to_model_input(load_dataset(str(tiny_data), "test").images)
    with torch.no_grad():
        mse = F.mse_loss(model.eval()(images), images.mean(dim=(2, 3))).item()
    assert summary["test_mse"] == pytest.approx(mse, rel=1e-5)


def test_unknown_task_and_evaluator_are_refused_before_writing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for flag, message in (
        (["--task", "nope"], "unknown task 'nope'"),
        (["--evaluators", "val", "nope"], "unknown evaluators ['nope']"),
    ):
        out = tmp_path / flag[1]
        assert main(["train", "--data", str(tiny_data), *flag, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "config.json").exists()


# ------------------------------------------------------------- evaluators, loop state


def test_evaluators_run_every_n_steps_and_are_drawn(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "every5"
    train(config(tiny_data, out, val_fraction=0.25, eval_every=5, epochs=2))
    assert [r["step"] for r in records(out, "val")] == [5, 10, 12]  # and at the end
    assert all({"loss", "accuracy"} <= r.keys() for r in records(out, "val"))
    assert (out / "curves.png").stat().st_size > 10_000


def test_loop_state_is_saved_whole(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "state"
    train(config(tiny_data, out, val_fraction=0.25, epochs=2))
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["vitkit_state"])
    fields = set(LoopState.__dataclass_fields__)
    assert fields <= saved.keys()
    state = LoopState.from_dict(saved)
    assert (state.step, state.epoch, state.train_images) == (12, 2, 12 * 32)
    assert state.best_step in (6, 12) and state.train_seconds > 0


def test_a_short_run_cuts_the_warm_up_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", "--epochs", "2", "--out", str(tmp_path / "short")]) == 0
    err = capsys.readouterr().err
    assert "warming up for a tenth of the run" in err
    assert json.loads((tmp_path / "short/summary.json").read_text())["epochs"] == 2


# ------------------------------------------------------- mid-epoch checkpoints, resume


def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(
    tiny_data: Path, tmp_path: Path
) -> None:
    cfg = dict(
        epochs=2,
        checkpoint_every=3,
        dropout=0.1,
        drop_path=0.1,
        val_fraction=0.25,
        augment=dict(random_resized_crop=True, crop_scale=(0.5, 1.0), hflip=True, mixup=0.2),
    )
    train(config(tiny_data, tmp_path / "whole", **cfg))

    with (
        interrupted_after_checkpoint(3) as steps,  # Ctrl-C right after the 3rd checkpoint
        pytest.raises(TrainingInterrupted, match=r"step 9; .*\(step 9\): .*--resume"),
    ):
        train(config(tiny_data, tmp_path / "cut", **cfg))
    assert steps == [3, 6, 9]  # mid-epoch, end of epoch 1 (6 steps), mid-epoch 2
    train(resume=tmp_path / "cut")
    same_tensors(tmp_path / "whole/last.safetensors", tmp_path / "cut/last.safetensors")
    drop = ("images_per_second",)
    for split in ("train", "val"):
        whole = [
            {k: v for k, v in r.items() if k not in drop}
            for r in records(tmp_path / "whole", split)
        ]
        cut = [
            {k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "cut", split)
        ]
        assert whole == cut, split


# slow: a real SIGKILL; a mid-epoch resume: test_resume_from_a_mid_epoch_checkpoint_is_bit_identical
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_data: Path, tmp_path: Path) -> None:
    """The CLI killed with SIGKILL at a random moment (checkpoints every 2 steps, 8 steps an
    epoch, so most likely mid-epoch), resumed, against the same run never interrupted."""
    settings = dict(
        data=str(tiny_data), epochs=12, batch_size=32, warmup_epochs=1.0, checkpoint_every=2
    )
    train(TrainConfig.from_dict({**settings, "out": str(tmp_path / "whole")}))
    cut = tmp_path / "cut"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    command = [sys.executable, "-m", "vitkit", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sigkill_after_checkpoint([*command, *flags, "--out", str(cut)], cut, env, settle=0.3)
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    done = subprocess.run(
        [*command, "--resume", str(cut)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    same_tensors(tmp_path / "whole/last.safetensors", cut / "last.safetensors")


def test_ctrl_c_says_where_to_resume(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = []
    original = loop_module.clip_gradients

    def interrupt_at_step_5(*args: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(loop_module, "clip_gradients", interrupt_at_step_5)
    out = tmp_path / "ctrl-c"
    args = ["train", "--data", str(tiny_data), "--epochs", "2", "--checkpoint-every", "2"]
    args += ["--batch-size", "32"]  # steps enough for a fifth one in two epochs
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"vitkit train: interrupted at step 4; the last checkpoint is {out}/last.safetensors "
        f"(step 4): continue with `vitkit train --resume {out}`"
    )
    assert "Traceback" not in "\n".join(err)


# ------------------------------------------------------------------- run folders


def test_two_runs_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_module, "default_out", lambda cfg: tmp_path / "runs/digits-same")
    first = run_module.claim_run_folder(None, TrainConfig())
    second = run_module.claim_run_folder(None, TrainConfig())
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "digits-same-2"


def test_resume_refuses_when_last_checkpoint_is_missing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    train(config(tiny_data, out, epochs=1))
    (out / "last.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", "--resume", str(out)]) == 2
    assert "last.safetensors is missing" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["train", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------ data sources


def test_in_memory_source_resumes_an_epoch_at_any_batch() -> None:
    source = InMemorySource(load_dataset("digits", "test"))
    whole = list(source.train_batches(16, seed=3, epoch=2))
    tail = list(source.train_batches(16, seed=3, epoch=2, start=5))
    assert len(tail) == len(whole) - 5
    for a, b in zip(whole[5:], tail, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_in_memory_source_ranks_are_disjoint_and_eval_counts_each_image_once() -> None:
    """Image i is filled with the value i, so every image says which one it is."""
    n = 100
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    source = InMemorySource(ImageDataset(images, torch.arange(n) % 4, list("abcd")))

    def ids(batches: Iterator[Batch]) -> list[int]:
        return [int(i) for b in batches for i in b.images[:, 0, 0, 0]]

    ranks = [ids(source.train_batches(8, seed=0, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 48  # 50 each, in whole batches of 8
    assert not set(ranks[0]) & set(ranks[1])
    assert len(set(ranks[0] + ranks[1])) == 96
    evaluated = [ids(source.eval_batches(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for rank in evaluated for i in rank) == list(range(n))
