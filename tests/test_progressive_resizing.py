"""Progressive resizing (``schedule.resize_start``, ``schedule.resize_ramp``): the sizes a run
trains at, step by step, against sizes worked out by hand; evaluation and the saved model at
the full size; a time budget still ending its schedule at its end value; the augmentations'
strength following the size (``schedule.resize_regularization``); the refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_cut_run_resumes_to, run_records
from tests.test_training import config
from vitkit import load_pretrained
from vitkit.data.augment import PerImageRandAugment
from vitkit.models import VisionTransformer
from vitkit.training import train
from vitkit.training.loop import Session
from vitkit.training.resizing import regularization_strength, training_size
from vitkit.training.tasks import Classification

pytestmark = pytest.mark.usefixtures("one_thread")

RESIZING = dict(model="vit_digits", resize_start=0.5, resize_ramp=[0.25, 0.75])


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    return tiny_digits(320, 100)  # 256 training digits: 8 steps of 32 an epoch


def training_sides(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The side of the images each training step of a run gets (filled as it trains)."""
    sides: list[int] = []
    step = Classification.step

    def recorded(self: Classification, net: torch.nn.Module, inputs: torch.Tensor, targets):  # type: ignore[no-untyped-def]
        sides.append(inputs.shape[-1])
        return step(self, net, inputs, targets)

    monkeypatch.setattr(Classification, "step", recorded)
    return sides


def test_the_size_grows_along_the_ramp_in_whole_patches() -> None:
    full, patch = (32, 32), (4, 4)
    sizes = [training_size(full, patch, 0.5, (0.4, 0.8), p) for p in (0, 0.4, 0.6, 0.7, 0.8, 1)]
    # 0.5, 0.5, 0.75, 0.875 and 1 of 32 px: 16, 16, 24, 28, 32, 32
    assert [h for h, _ in sizes] == [16, 16, 24, 28, 32, 32]
    assert training_size(full, patch, 0.3, (0.4, 0.8), 0.0) == (8, 8)  # 9.6 px: down to 8
    assert training_size(full, patch, 0.05, (0.4, 0.8), 0.0) == (4, 4)  # never under a patch
    assert training_size((48, 32), (16, 4), 0.5, (0.0, 0.0), 0.0) == (48, 32)  # no ramp: full
    assert training_size((48, 32), (16, 4), 0.5, (0.5, 1.0), 0.0) == (16, 16)  # 24 -> 16, 16
    assert training_size(full, patch, 1.0, (0.4, 0.8), 0.0) == full  # off


def test_a_run_trains_small_first_then_at_full_size_and_evaluates_at_full_size(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sides = training_sides(monkeypatch)
    evaluated: list[int] = []
    forward = VisionTransformer.forward

    def watched(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            evaluated.append(x.shape[-1])
        return forward(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", watched)
    train(config(tiny_data, tmp_path / "run", epochs=5, **RESIZING))
    # 40 steps of vit_digits (8 px, 2 px patches): 4 px to step 10 (progress 0.25) and on
    # while 8 x (0.5 + progress - 0.25) is under 6, 6 px from step 20, 8 px from step 30.
    assert sides == [4] * 20 + [6] * 10 + [8] * 10
    assert set(evaluated) == {8}
    model = load_pretrained(tmp_path / "run/best.safetensors")
    assert model.cfg.img_size == (8, 8) and model.cfg.dynamic_img_size


def test_the_regularization_grows_with_the_image_side() -> None:
    full = (32, 32)
    # From 0.25 at 16 px (half the side) to 1 at 32 px: 24 px is halfway, 0.25 + 0.75 / 2.
    strengths = [regularization_strength((s, s), full, 0.5, 0.25) for s in (16, 24, 28, 32)]
    assert strengths == pytest.approx([0.25, 0.625, 0.8125, 1.0])
    assert regularization_strength((8, 8), full, 0.3, 0.0) == 0.0  # rounded below the start
    assert regularization_strength((16, 32), full, 0.5, 0.0) == pytest.approx(0.5)  # mean side
    assert regularization_strength(full, full, 1.0, 0.0) == 1.0  # no resizing: full strength


def test_randaugment_follows_the_size_and_a_resumed_run_too(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shares: list[float] = []
    forward = PerImageRandAugment.forward

    def watched(self: PerImageRandAugment, images: torch.Tensor, share: float) -> torch.Tensor:
        shares.append(share)
        return forward(self, images, share)

    monkeypatch.setattr(PerImageRandAugment, "forward", watched)
    adaptive = dict(
        epochs=5,
        resize_regularization=0.2,
        augment=dict(random_resized_crop=False, randaugment=[2, 9]),
        **RESIZING,
    )
    train(config(tiny_data, tmp_path / "whole", **adaptive))
    # Sides 4, 6, 8 px of 8 (as above): 0.2, then 0.2 + 0.8 x 0.5 at 6 px, then 1.
    assert shares == pytest.approx([0.2] * 20 + [0.6] * 10 + [1.0] * 10)
    assert_cut_run_resumes_to(tmp_path / "whole", config(tiny_data, tmp_path / "cut", **adaptive))


# slow: waits for the C++ compiler, once for each size
@pytest.mark.slow
def test_compiled_resizing_computes_what_eager_does(tiny_data: Path, tmp_path: Path) -> None:
    """--compile with resizing compiles each block for each size (stochastic depth gives the
    blocks different graphs) and trains as the eager run does, step for step."""
    exact = dict(epochs=5, optimizer="sgd", lr=0.05, drop_path=0.2, evaluators=[], **RESIZING)
    train(config(tiny_data, tmp_path / "eager", **exact))
    train(config(tiny_data, tmp_path / "compiled", compile=True, **exact))
    eager, compiled = run_records(tmp_path / "eager"), run_records(tmp_path / "compiled")
    assert len(compiled) == 40  # every step logged, through the sizes 4, 6 and 8 px
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-5)


def test_a_time_boxed_run_ends_its_schedule_at_the_full_size(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small steps are faster: the budget's speed is measured again at each size, so the
    schedule is fitted at the full size by the end (an average over the faster small steps
    would plan steps there is no time for, and the budget would stop the run early)."""
    seconds = {4: 0.02, 6: 0.05, 8: 0.1}
    sides = training_sides(monkeypatch)
    monkeypatch.setattr(
        Session, "spent_seconds", lambda self, this_segment=True: sum(seconds[s] for s in sides)
    )
    cfg = config(tiny_data, tmp_path / "run", epochs=10, max_minutes=0.04, **RESIZING)
    summary = train(cfg)
    assert summary["budget_spent"] and summary["steps"] < 80
    assert sides[0] == 4 and sides[-1] == 8
    lrs = [r["lr"] for r in run_records(tmp_path / "run")]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9 * cfg.optim.lr)  # the schedule's end value


def test_the_size_never_shrinks_when_a_refit_lengthens_the_run(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps at 6 px measured faster than at 4 px (as a noisy first measurement at a new size
    can be) lengthen the fitted run, which moves its progress back below the 6-px mark."""
    seconds = {4: 0.1, 6: 0.02, 8: 0.1}
    sides = training_sides(monkeypatch)
    monkeypatch.setattr(
        Session, "spent_seconds", lambda self, this_segment=True: sum(seconds[s] for s in sides)
    )
    train(config(tiny_data, tmp_path / "run", epochs=10, max_minutes=0.04, **RESIZING))
    assert 6 in sides and sides == sorted(sides)


def test_a_resumed_run_continues_at_the_size_of_its_step(tiny_data: Path, tmp_path: Path) -> None:
    train(config(tiny_data, tmp_path / "whole", epochs=5, **RESIZING))
    assert_cut_run_resumes_to(
        tmp_path / "whole", config(tiny_data, tmp_path / "cut", epochs=5, **RESIZING)
    )


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        (dict(model="resnetv2_digits"), "needs a ViT-family model, not a ResNetV2"),
        (
            dict(model="vit_digits", task="mpp", augment=dict(label_smoothing=0.0)),
            "the mpp task trains at the model's image size",
        ),
        (dict(model="vit_digits", resize_ramp=[0.8, 0.4]), "resize_ramp must satisfy"),
        (dict(model="vit_digits", resize_start=0.0), r"resize_start must be in \(0, 1\]"),
        (dict(model="vit_digits", resize_regularization=1.5), "resize_regularization must be in"),
        (
            dict(model="vit_digits", resize_start=1.0, resize_regularization=0.5),
            "set resize_start below 1 too",
        ),
    ],
)
def test_what_cannot_resize_is_refused_before_a_step(
    tiny_data: Path, tmp_path: Path, settings: dict, refusal: str
) -> None:
    with pytest.raises(ValueError, match=refusal):
        train(config(tiny_data, tmp_path / "run", **{"resize_start": 0.5, **settings}))
