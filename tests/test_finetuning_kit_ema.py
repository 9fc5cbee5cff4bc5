"""--ema (a moving average of the weights beside them) and --patience (early stopping): the
average against one computed by hand from the weights a step hook records, with timm's warm-up
of the decay; the best checkpoint and the test split following the weights that scored best;
early stopping after exactly N evaluations without improvement; both across --resume."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import interrupted_after_checkpoint, run_records, train_config
from vitkit import load_pretrained
from vitkit.checkpoints.native import STATE_PREFIX
from vitkit.data.sources import open_splits
from vitkit.evaluation import evaluate
from vitkit.training import TrainConfig, TrainingInterrupted, train
from vitkit.training.ema import ema_decay
from vitkit.training.evaluators import TaskEvaluator
from vitkit.training.loop import LoopState, run_evaluators
from vitkit.training.run import RunFolder
from vitkit.training.tasks import Classification

pytestmark = pytest.mark.usefixtures("one_thread")

# 128 training digits, a quarter held out for validation: 2 steps an epoch.
TINY = dict(
    model="vit_digits",
    batch_size=32,
    lr=3e-3,
    warmup_steps=1,
    log_every=1,
    val_fraction=0.25,
    augment=dict(random_resized_crop=False),
)
config = partial(train_config, TINY)
EMA = STATE_PREFIX + "ema/"


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    return tiny_digits(128, 40)


def timm_decay(step: int, decay: float) -> float:
    """timm's ``ModelEmaV3.get_decay`` with ``use_warmup=True`` and its defaults, as written
    there (``update_after_step`` 0, ``warmup_gamma`` 1, ``warmup_power`` 2/3, ``min_decay`` 0)."""
    step = max(0, step - 0 - 1)
    if step <= 0:
        return 0.0
    warmed = 1 - (1 + step / 1.0) ** -(2 / 3)
    return max(min(warmed, decay), 0.0)


def test_the_decay_is_warmed_up_as_timms() -> None:
    for step in [0, 1, 2, 3, 10, 32, 1000, 31_623, 10**6]:
        for decay in (0.5, 0.99, 0.9999):
            assert ema_decay(step, decay) == pytest.approx(timm_decay(step, decay), abs=1e-12)
    assert ema_decay(1, 0.9999) == 0.0  # the first update copies the weights


def recorded_weights() -> tuple[list[dict[str, torch.Tensor]], Any]:
    weights: list[dict[str, torch.Tensor]] = []

    def hook(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    return weights, hook


def test_the_average_is_the_hand_computed_ema_of_the_weights(
    tiny_data: Path, tmp_path: Path
) -> None:
    weights, hook = recorded_weights()
    out = tmp_path / "run"
    train(config(tiny_data, out, steps=5, ema=0.6), step_hooks=[hook])

    saved = load_file(str(out / "last.safetensors"))
    assert len(weights) == 5
    for key in ("head.weight", "blocks.0.attn.qkv.weight", "cls_token"):
        expected = weights[0][key].clone()
        for step, after in enumerate(weights[1:], start=2):
            decay = timm_decay(step, 0.6)
            expected = decay * expected + (1 - decay) * after[key]
        assert torch.allclose(saved[EMA + key], expected, atol=1e-6), key
        assert not torch.allclose(saved[EMA + key], saved[key], atol=1e-4), key  # averaged
    # Evaluated beside the raw weights at every evaluation.
    evaluated = [r["step"] for r in run_records(out, "val")]
    assert [r["step"] for r in run_records(out, "val_ema")] == evaluated == [2, 4, 5]


def test_a_resumed_run_with_ema_ends_bit_identical(tiny_data: Path, tmp_path: Path) -> None:
    settings = dict(epochs=3, ema=0.8)
    whole = train(config(tiny_data, tmp_path / "whole", **settings))
    with interrupted_after_checkpoint(2), pytest.raises(TrainingInterrupted):
        train(config(tiny_data, tmp_path / "cut", **settings))
    resumed = train(resume=tmp_path / "cut")

    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith(EMA) for k in load_file(str(tmp_path / "cut/last.safetensors")))
    for key in ("test_accuracy", "best_val_accuracy", "best_step", "best_weights"):
        assert whole[key] == resumed[key], key


class ScoredByWeights:
    """An evaluator scoring the raw weights and their average (whose parameters need no
    gradient) from two fixed sequences."""

    def __init__(self, raw: list[float], averaged: list[float], name: str = "val") -> None:
        self.name, self.raw, self.averaged = name, raw, averaged

    def run(self, model: nn.Module, process: Any) -> dict[str, Any]:
        averaged = not next(model.parameters()).requires_grad
        return {"accuracy": (self.averaged if averaged else self.raw).pop(0), "loss": 1.0}


def test_the_best_is_whichever_weights_score_better_the_average_on_a_tie(
    tmp_path: Path,
) -> None:
    raw, averaged = nn.Linear(1, 1), nn.Linear(1, 1).requires_grad_(False)
    evaluator = ScoredByWeights([0.5, 0.7, 0.6, 0.8], [0.6, 0.65, 0.7, 0.8])
    state = LoopState()

    class Quiet:
        is_main = False

    picked = []
    for step in range(4):
        state.step = step
        args = ([evaluator], Classification(TrainConfig()), raw, RunFolder(tmp_path), Quiet())
        is_best = run_evaluators(*args, state, 1, "val", averaged)  # type: ignore[arg-type]
        picked.append((is_best, state.best_weights, state.best_value))
    assert picked == [
        (True, "ema", 0.6),
        (True, "raw", 0.7),
        (False, "raw", 0.7),  # the average's 0.7 only equals the best
        (True, "ema", 0.8),
    ]


@pytest.fixture
def scores(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``scores(raw, averaged=...)``: the 'val' evaluator returns these accuracies in turn."""

    def use(raw: list[float], averaged: list[float] | None = None) -> None:
        evaluator = ScoredByWeights(raw, averaged or [])
        monkeypatch.setattr(
            TaskEvaluator, "run", lambda self, model, process: evaluator.run(model, process)
        )

    yield use


def test_best_and_test_use_the_average_when_it_scores_better(
    tiny_data: Path, tmp_path: Path, scores: Callable[..., None]
) -> None:
    scores([0.5, 0.6, 0.7], averaged=[0.9, 0.6, 0.6])  # the average's first evaluation wins
    out = tmp_path / "run"
    summary = train(config(tiny_data, out, epochs=3, ema=0.9))

    assert (summary["best_weights"], summary["best_step"]) == ("ema", 2)
    best = load_file(str(out / "best.safetensors"))
    last = load_file(str(out / "last.safetensors"))
    assert not all(torch.equal(best[k], last[k]) for k in best)
    # The test split is scored with the model best.safetensors holds.
    test = open_splits(str(tiny_data), 0.25, 0).test
    expected = evaluate(load_pretrained(out / "best.safetensors"), test).accuracy
    assert summary["test_accuracy"] == pytest.approx(expected, abs=1e-12)


def stopping_run(tiny_data: Path, out: Path, patience: int) -> TrainConfig:
    return config(tiny_data, out, steps=12, eval_every=1, patience=patience)


def test_patience_stops_after_exactly_n_evaluations_without_improvement(
    tiny_data: Path,
    tmp_path: Path,
    scores: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Improves at evaluations 1, 2 and 5; then 3 without: stops at the 8th (step 8), not at
    # the 4th, after only 2 without improvement since the 2nd.
    scores([0.5, 0.6, 0.55, 0.58, 0.61, 0.6, 0.61, 0.3] + [0.9] * 4)
    with caplog.at_level(logging.INFO, logger="vitkit"):
        summary = train(stopping_run(tiny_data, tmp_path / "run", patience=3))

    assert summary["stopped_early"] and not summary["budget_spent"]
    assert (summary["steps"], summary["best_step"]) == (8, 5)
    assert [r["step"] for r in run_records(tmp_path / "run", "val")] == list(range(1, 9))
    assert "stopping early at step 8" in caplog.text
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_without_patience_the_run_goes_on(
    tiny_data: Path, tmp_path: Path, scores: Callable[..., None]
) -> None:
    scores([0.5] + [0.1] * 11)
    summary = train(stopping_run(tiny_data, tmp_path / "run", patience=0))
    assert (summary["steps"], summary["stopped_early"], summary["best_step"]) == (12, False, 1)


def test_patience_counts_across_resume(
    tiny_data: Path, tmp_path: Path, scores: Callable[..., None]
) -> None:
    scores([0.5, 0.6, 0.55, 0.58, 0.59] + [0.9] * 7)  # stops at step 5
    with interrupted_after_checkpoint(4), pytest.raises(TrainingInterrupted):
        train(stopping_run(tiny_data, tmp_path / "cut", patience=3))
    saved = LoopState.from_dict(RunFolder(tmp_path / "cut").checkpoint_counters())
    assert (saved.step, saved.evals_without_improvement) == (4, 2)
    summary = train(resume=tmp_path / "cut")  # one more without improvement: the third
    assert (summary["steps"], summary["stopped_early"], summary["best_step"]) == (5, True, 2)
    # A run that stopped early stays stopped when resumed again.
    assert train(resume=tmp_path / "cut")["steps"] == 5


def test_monitor_names_another_metric_with_its_direction(
    tiny_data: Path, tmp_path: Path, scores: Callable[..., None]
) -> None:
    with pytest.raises(ValueError, match="--monitor-mode max or min"):
        train(config(tiny_data, tmp_path / "a", steps=2, monitor="loss"))
    scores([0.9, 0.1, 0.1, 0.1])  # accuracy falls, the (constant) loss never improves
    summary = train(
        config(tiny_data, tmp_path / "b", steps=4, eval_every=1, monitor="loss").replace(
            evaluators={"monitor_mode": "min", "patience": 2}
        )
    )
    assert (summary["steps"], summary["best_step"]) == (3, 1)


def test_bad_settings_are_one_line_errors(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ema must be in"):
        config(tiny_data, tmp_path / "a", ema=1.0)
    with pytest.raises(ValueError, match="--patience watches"):
        train(config(tiny_data, tmp_path / "b", steps=2, patience=2, val_fraction=0.0))
    with pytest.raises(ValueError, match="--parallel ddp"):
        train(config(tiny_data, tmp_path / "c", steps=2, ema=0.9, parallel="fsdp"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_summary_says_what_best_holds(tiny_data: Path, tmp_path: Path) -> None:
    summary = json.loads(json.dumps(train(config(tiny_data, tmp_path / "run", steps=3))))
    assert (summary["ema"], summary["best_weights"], summary["stopped_early"]) == (
        0.0,
        "raw",
        False,
    )
