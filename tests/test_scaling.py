"""BiT-HyperRule (the "bit" schedule, the rule's numbers, ``finetune --recipe bit``), training on
a fraction of the data, the time budget, and ``vitkit experiment scaling`` killed and rerun."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vitkit.analysis.scaling import COMPUTE_FIGURE, SIZE_FIGURE
from vitkit.cli import main
from vitkit.data import load_dataset
from vitkit.data.sources import open_splits
from vitkit.experiments import runs, scaling
from vitkit.experiments.scaling import ScalingExperiment, run_scaling
from vitkit.models import create_model, flops_per_image, model_config
from vitkit.training import RunFolder, TrainConfig, TrainingInterrupted, train
from vitkit.training.optim import build_schedule, lr_factor
from vitkit.training.recipes import HyperRule, bit_config, bit_hyperrule

QUICK = dict(
    batch_size=32,
    log_every=1,
    checkpoint_every=2,
    warmup_epochs=0.0,
    augment=dict(random_resized_crop=False),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=10).tolist()


def digits_examples(fraction: float) -> int:
    """Training digits in a stratified ``fraction``: rounded class by class."""
    return sum(round(fraction * n) for n in class_counts(load_dataset("digits", "train").labels))


# ------------------------------------------------------------------ the recipe


def bit_formula(step: int) -> float:
    """BiT-HyperRule below 20k images, written out: linear warm-up over 100 steps, then the
    peak divided by 10 from step 200, 300 and 400 on."""
    if step < 100:
        return (step + 1) / 100
    return {0: 1.0, 1: 0.1, 2: 0.01, 3: 0.001}[(step >= 200) + (step >= 300) + (step >= 400)]


@pytest.mark.parametrize("step", [0, 49, 99, 100, 199, 200, 299, 300, 399, 400, 499])
def test_bit_schedule_follows_the_formula(step: int) -> None:
    assert lr_factor(step, 100, 500, "bit", [200, 300, 400]) == pytest.approx(bit_formula(step))


def test_bit_schedule_drives_the_optimizer() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    scheduler = build_schedule(optimizer, 100, 500, "bit", [200, 300, 400])
    seen = {}
    for step in range(500):
        seen[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for step in (0, 150, 250, 350, 450):
        assert seen[step] == pytest.approx(0.003 * bit_formula(step))


@pytest.mark.parametrize(
    ("examples", "image", "rule"),
    [
        (10_000, (32, 32), HyperRule(100, (200, 300, 400), 500, 0.0, 160, 128)),
        (19_999, (95, 96), HyperRule(100, (200, 300, 400), 500, 0.0, 160, 128)),
        (20_000, (224, 224), HyperRule(500, (3_000, 6_000, 9_000), 10_000, 0.1, 512, 480)),
        (499_999, (96, 96), HyperRule(500, (3_000, 6_000, 9_000), 10_000, 0.1, 512, 480)),
        (1_281_167, (8, 8), HyperRule(500, (6_000, 12_000, 18_000), 20_000, 0.1, 160, 128)),
    ],
)
def test_hyperrule_numbers_by_dataset_size_and_image_area(
    examples: int, image: tuple[int, int], rule: HyperRule
) -> None:
    assert bit_hyperrule(examples, image) == rule


def test_bit_config_on_digits_scales_lr_with_the_batch_and_keeps_explicit_settings() -> None:
    base = TrainConfig(batch_size=128)
    cfg = bit_config(base)
    # 1,438 training digits of 8x8: the small-data rule; lr 0.003 at batch 512, linearly.
    schedule = cfg.schedule
    assert (schedule.name, schedule.steps, schedule.warmup_steps) == ("bit", 500, 100)
    assert schedule.lr_drops == [200, 300, 400]
    assert cfg.optim.lr == pytest.approx(0.003 * 128 / 512)
    assert cfg.augment.mixup == 0.0 and cfg.augment.hflip
    assert cfg.augment.crop_scale == pytest.approx((0.64, 0.64))  # (128 / 160)^2
    kept = bit_config(base.replace(optim={"lr": 0.5}, schedule={"steps": 50}), keep={"lr", "steps"})
    # The recipe's shape at an explicit length: everything scaled by 50 / 500.
    schedule = kept.schedule
    assert (kept.optim.lr, schedule.steps, schedule.warmup_steps, schedule.lr_drops) == (
        0.5,
        50,
        10,
        [20, 30, 40],
    )


def test_finetune_recipe_bit_trains_with_the_resolved_rule(tmp_path: Path) -> None:
    checkpoint = create_model("vit_digits").save_pretrained(tmp_path / "pre.safetensors")
    out = tmp_path / "bit"
    code = main(
        [
            "finetune",
            "--from",
            str(checkpoint),
            "--recipe",
            "bit",
            "--data",
            "digits",
            "--batch-size",
            "64",
            "--steps",
            "5",
            "--log-every",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    optim, schedule = cfg["optim"], cfg["schedule"]
    assert (optim["name"], optim["momentum"], optim["weight_decay"], optim["grad_clip"]) == (
        "sgd",
        0.9,
        0.0,
        0.0,
    )
    assert (schedule["name"], schedule["steps"], schedule["warmup_steps"]) == ("bit", 5, 1)
    assert schedule["lr_drops"] == [2, 3, 4]
    assert cfg["presets"] == ["finetune", "bit"]
    lrs = [
        json.loads(line)["lr"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    peak = 0.003 * 64 / 512
    # After steps 1..5 the next step's rate: the peak, then a tenth at each of 2, 3, 4.
    assert lrs == pytest.approx([peak, peak / 10, peak / 100, peak / 1000, peak / 1000])
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


# ------------------------------------------------------------------ fractions and budget


def test_stratified_fractions_keep_class_proportions_and_nest() -> None:
    full = load_dataset("digits", "train")
    test = open_splits("digits", 0.0, 0).test
    subsets = {}
    for fraction in (0.3, 0.6):
        splits = open_splits("digits", 0.0, 0, train_fraction=fraction)
        subsets[fraction] = splits.train.dataset
        expected = [round(fraction * n) for n in class_counts(full.labels)]
        assert class_counts(splits.train.dataset.labels) == expected
        assert torch.equal(splits.test.dataset.images, test.dataset.images)
    small, large = (subsets[f].images.flatten(1) for f in (0.3, 0.6))
    assert (small[:, None] == large[None]).all(-1).any(1).all()  # every 30% image is in the 60%
    with pytest.raises(ValueError, match="without training images: raise the fraction"):
        open_splits("digits", 0.0, 0, train_fraction=0.001)


def test_steps_override_epochs_and_max_minutes_stops_then_tests(tmp_path: Path) -> None:
    values = dict(QUICK, model="vit_digits", train_fraction=0.2)
    by_steps = train(TrainConfig.from_dict(dict(values, steps=3, out=str(tmp_path / "steps"))))
    examples = digits_examples(0.2)
    assert (by_steps["steps"], by_steps["budget_spent"]) == (3, False)
    assert by_steps["train_examples"] == examples
    assert by_steps["epochs"] == round(3 / (examples // 32), 3)
    budget = train(TrainConfig.from_dict(dict(values, max_minutes=1e-6, out=str(tmp_path / "b"))))
    assert (budget["steps"], budget["budget_spent"]) == (1, True)
    assert 0.0 <= budget["test_accuracy"] <= 1.0 and (tmp_path / "b/best.safetensors").is_file()


# ------------------------------------------------------------------ the experiment


def test_scaling_experiment_killed_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "scaling"
    (tmp_path / "quick.toml").write_text(
        "batch_size = 32\nlog_every = 1\ncheckpoint_every = 2\nwarmup_epochs = 0.0\n"
        "[augment]\nrandom_resized_crop = false\n"
    )
    experiment = ScalingExperiment(
        "digits",
        [0.2, 0.1],
        ["vit_digits", "resnetv2_digits"],
        out,
        epochs=1,
        base={k: v for k, v in QUICK.items()},
    )
    calls: list[tuple[str | None, Any]] = []

    def killed_in_the_second_run(
        cfg: TrainConfig | None = None, resume: Any = None, progress: Any = None
    ) -> dict[str, Any]:
        calls.append((cfg.model.name if cfg else None, resume))

        def kill(step: int, total: int, record: Any) -> None:
            if len(calls) == 2 and step == 3:
                raise KeyboardInterrupt  # after the checkpoint at step 2

        return train(cfg, resume, kill)

    monkeypatch.setattr(runs, "train", killed_in_the_second_run)
    with pytest.raises(TrainingInterrupted):
        run_scaling(experiment)
    first, second = out / "runs/vit_digits-f0.1", out / "runs/vit_digits-f0.2"
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    assert (out / "results.csv").is_file()  # written after every finished run

    calls.clear()
    monkeypatch.setattr(
        runs,
        "train",
        lambda cfg=None, resume=None, progress=None: (
            calls.append((cfg.model.name if cfg else None, resume)),
            train(cfg, resume, progress),
        )[1],
    )
    argv = [
        "experiment",
        "scaling",
        "--data",
        "digits",
        "--fractions",
        "0.1",
        "0.2",
        "--models",
        "vit_digits",
        "resnetv2_digits",
        "--epochs",
        "1",
        "--config",
        str(tmp_path / "quick.toml"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    # The finished run is read back, the killed one resumed, the others trained.
    assert calls == [(None, second), ("resnetv2_digits", None), ("resnetv2_digits", None)]
    resumed = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    steps = digits_examples(0.2) // 32
    assert [r["step"] for r in resumed if r["split"] == "train"] == list(range(1, steps + 1))

    rows = list(csv.DictReader((out / "results.csv").open()))
    examples = {f: digits_examples(f) for f in (0.1, 0.2)}
    assert [(r["model"], float(r["fraction"]), int(r["examples"])) for r in rows] == [
        (m, f, examples[f]) for m in ("vit_digits", "resnetv2_digits") for f in (0.1, 0.2)
    ]
    for row in rows:
        flops = flops_per_image(model_config(row["model"], num_classes=10, in_chans=1))
        steps = examples[float(row["fraction"])] // 32
        assert int(row["steps"]) == steps
        assert float(row["gflops_per_image"]) == pytest.approx(flops / 1e9)
        assert float(row["train_flops"]) == pytest.approx(3 * flops * steps * 32)
        assert int(row["params"]) == create_model(row["model"]).num_parameters()
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[0].startswith("| model | fraction | examples")
    assert capsys.readouterr().out.startswith(table[0])
    report = (out / "report.html").read_text()
    assert "<th>test accuracy</th>" in report and report.count("<td>vit_digits</td>") == 2
    for figure in (SIZE_FIGURE, COMPUTE_FIGURE):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert figure in report

    with pytest.raises(ValueError, match=r"other settings .*epochs: 1 there, 2 now"):
        run_scaling(
            ScalingExperiment("digits", [0.1], ["vit_digits"], out, epochs=2, base=dict(QUICK))
        )


def test_a_run_killed_before_its_first_checkpoint_trains_again_from_step_0(
    tmp_path: Path,
) -> None:
    cfg = TrainConfig.from_nested(
        {
            "model": {"name": "vit_digits"},
            "data": {"source": "digits"},
            "optim": {"batch_size": 32},
            "schedule": {"steps": 4, "warmup_epochs": 0.0},
            "augment": {"random_resized_crop": False},
            "run": {"log_every": 1, "checkpoint_every": 3, "out": str(tmp_path / "run")},
        }
    )

    def killed_at_step_2(step: int, total: int, record: Any) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="before the first checkpoint"):
        train(cfg, progress=killed_at_step_2)
    run = RunFolder(tmp_path / "run")
    assert run.read_metrics() and run.latest_checkpoint() is None  # logged, nothing saved
    with pytest.raises(ValueError, match="resuming would start again from step 0"):
        train(resume=run.path)  # what a user is told: their logged progress would be lost

    assert runs.finished_run(cfg)["steps"] == 4
    assert [r["step"] for r in run.read_metrics() if r["split"] == "train"] == [1, 2, 3, 4]


def test_scaling_under_a_time_budget_is_time_boxed_by_the_loop_and_reruns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def experiment() -> ScalingExperiment:
        return ScalingExperiment(
            "digits", [0.1], ["vit_digits"], tmp_path, budget_minutes=0.005, base=dict(QUICK)
        )

    (row,) = run_scaling(experiment())
    run = tmp_path / "runs/vit_digits-f0.1"
    cfg = json.loads((run / "config.json").read_text())
    # The budget goes to the run itself, which sizes its schedule as it trains.
    assert (cfg["schedule"]["max_minutes"], cfg["schedule"]["steps"]) == (0.005, 0)
    summary = json.loads((run / "summary.json").read_text())
    configured = 150 * (digits_examples(0.1) // 32)  # the default epochs bound the length
    assert summary["budget_spent"] and 1 <= row["steps"] < configured
    monkeypatch.setattr(runs, "train", lambda *a, **k: pytest.fail("a finished run retrained"))
    assert run_scaling(experiment()) == [row]


def test_a_budget_run_folder_of_the_calibrating_version_is_read_back(tmp_path: Path) -> None:
    """Before runs were time-boxed by the loop the experiment wrote its calibrated ``steps``
    into each run's config; such a folder still counts as the same run."""
    experiment = ScalingExperiment(
        "digits", [0.1], ["vit_digits"], tmp_path, budget_minutes=0.005, base=dict(QUICK)
    )
    (row,) = run_scaling(experiment)
    config = tmp_path / "runs/vit_digits-f0.1/config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), steps=7)))
    assert run_scaling(experiment) == [row]


def test_experiment_refuses_bad_plans() -> None:
    with pytest.raises(ValueError, match="exactly one of --epochs and --budget-minutes"):
        ScalingExperiment("digits", [0.5], ["vit_digits"], Path("x"))
    with pytest.raises(ValueError, match=r"--fractions must lie in \(0, 1\]"):
        ScalingExperiment("digits", [0.0, 0.5], ["vit_digits"], Path("x"), epochs=1)
    with pytest.raises(ValueError, match="sets model itself"):
        ScalingExperiment(
            "digits", [0.5], ["vit_digits"], Path("x"), epochs=1, base={"model": "vit_cifar"}
        )


def test_the_old_home_of_the_experiment_says_where_it_went() -> None:
    import vitkit.analysis.scaling as old

    with pytest.raises(AttributeError, match=r"import it from vitkit\.experiments\.scaling"):
        old.run_scaling  # noqa: B018
    with pytest.raises(AttributeError, match="the training loop's max_minutes"):
        old.measure_train_speed  # noqa: B018
    # and where it says holds them, the shared run check among them
    assert scaling.check_same_settings is runs.check_same_settings
