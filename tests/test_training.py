"""Training, fine-tuning, evaluation, prediction, run folders, resume and DDP.

Every run is a tiny ViT on a few hundred of the shipped digits, so each takes seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import (
    interrupted_after_checkpoint,
    run_records,
    sigkill_after_checkpoint,
    torchrun,
    train_config,
)
from vitkit import load_pretrained
from vitkit.cli import main
from vitkit.cli.train import one_line_summary
from vitkit.data import load_dataset
from vitkit.data.sources import open_splits
from vitkit.models import VisionTransformer, create_model
from vitkit.training import TrainConfig, TrainingDiverged, TrainingInterrupted, train
from vitkit.training.optim import decayed_parameter_names, lr_factor

# A few epochs on 256 images learn something only without the main job's random crops.
NO_AUGMENT = dict(random_resized_crop=False)
TINY = dict(
    epochs=3,
    batch_size=32,
    lr=3e-3,
    warmup_epochs=1.0,
    log_every=1,
    val_fraction=0.2,
    augment=NO_AUGMENT,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    """320 training and 100 test digits."""
    return tiny_digits(320, 100)


config = partial(train_config, TINY)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the model and its training state."""
    return load_file(str(path))


def run_ok(command: list[str], env: dict[str, str]) -> None:
    """Run a command to completion; on failure, show what it printed."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    # The first error of a failing process sits above torchrun's summary: keep plenty.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-20000:]


@pytest.fixture(scope="module")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(config(tiny_data, out, epochs=12, warmup_epochs=1.0))
    return out


# ------------------------------------------------------------------- the optimisation


def test_schedule_follows_the_formulas() -> None:
    # Linear warm-up over 4 steps reaches the peak at the 4th step.
    assert [lr_factor(s, 4, 14, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine: half-way through the decay is half the peak, the end is zero.
    assert lr_factor(4 + 5, 4, 14, "cosine") == pytest.approx(0.5)
    assert lr_factor(14, 4, 14, "cosine") == pytest.approx(0.0, abs=1e-12)
    # Linear: a quarter of the way through the decay is 3/4 of the peak.
    assert lr_factor(4 + 2.5, 4, 14, "linear") == pytest.approx(0.75)


def test_weight_decay_only_on_weight_matrices() -> None:
    model = create_model("vit_micro", num_classes=10)
    decayed = decayed_parameter_names(model)
    names = dict(model.named_parameters())
    # Per block: qkv, proj, fc1, fc2 kernels; plus the patch projection and the head.
    assert len(decayed) == 4 * model.cfg.depth + 2
    assert decayed <= set(names)
    assert all(names[n].ndim >= 2 for n in decayed)
    for kept in (
        "cls_token",
        "pos_embed.weight",
        "head.bias",
        "norm.weight",
        "blocks.0.norm1.bias",
    ):
        assert kept not in decayed


def test_a_few_steps_lower_the_loss(trained_run: Path) -> None:
    records = run_records(trained_run)
    # A zero-initialised head predicts the uniform distribution: the first loss is ln(10).
    assert records[0]["loss"] == pytest.approx(math.log(10), abs=1e-4)
    assert records[-1]["loss"] < 0.7 * math.log(10)


def test_test_accuracy_is_the_best_models_on_the_test_set(
    trained_run: Path, tiny_data: Path
) -> None:
    """Recount the summary's test results from scratch: the saved best model's predictions on
    the 100 test digits, scaled to the model's [-1, 1] here rather than by the evaluator."""
    summary = json.loads((trained_run / "summary.json").read_text())
    model = load_pretrained(trained_run / "best.safetensors")
    with np.load(tiny_data) as data:
        images, labels = data["x_test"], data["y_test"]
    # 8x8 digits and an 8x8 model: no resizing, only the scaling to [-1, 1].
    assert images.shape == (100, 1, 8, 8) and model.cfg.img_size == (8, 8)
    with torch.no_grad():
        logits = model((torch.from_numpy(images).float() - 127.5) / 127.5)
    predicted = logits.argmax(-1).numpy()
    assert summary["test_accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    assert summary["confusion_matrix"] == confusion.tolist()
    assert summary["test_images"] == 100
    line = one_line_summary(summary)
    assert line.startswith(f"test accuracy {np.mean(predicted == labels):.2%}, test loss ")
    assert "on 100 test images" in line


def mirrored_test_digits(data: Path) -> tuple[list[torch.Tensor], np.ndarray]:
    """The test digits and their mirror images, scaled as the model takes them; the labels."""
    with np.load(data) as arrays:
        images, labels = arrays["x_test"], arrays["y_test"]
    scaled = [
        (torch.from_numpy(a.copy()).float() - 127.5) / 127.5 for a in (images, images[..., ::-1])
    ]
    return scaled, labels


def test_a_run_with_flip_tta_scores_its_test_split_with_mirror_images(
    tiny_data: Path, tmp_path: Path
) -> None:
    """``--tta flip``: the summary's test accuracy is the best model's on the mean logits of
    each test digit and its mirror image, recounted here."""
    out = tmp_path / "tta"
    summary = train(config(tiny_data, out, epochs=2, tta="flip"))
    model = load_pretrained(out / "best.safetensors")
    scaled, labels = mirrored_test_digits(tiny_data)
    with torch.no_grad():
        logits = model(scaled[0]) + model(scaled[1])
    assert summary["test_accuracy"] == pytest.approx(
        np.mean(logits.argmax(-1).numpy() == labels), abs=1e-12
    )
    assert summary["tta"] == "flip"
    assert "(flip test-time augmentation)" in one_line_summary({**summary, "run_folder": out})


def test_test_tta_scores_the_test_split_alone_and_leaves_validation_as_tta_says(
    tiny_data: Path, tmp_path: Path
) -> None:
    """``--test-tta flip`` beside ``--tta none``: validation as without it (the same records,
    so the same best checkpoint), the test accuracy that of the flip mean, recounted here."""
    plain = train(config(tiny_data, tmp_path / "plain", epochs=2))
    out = tmp_path / "test_tta"
    summary = train(config(tiny_data, out, epochs=2, test_tta="flip"))
    model = load_pretrained(out / "best.safetensors")
    scaled, labels = mirrored_test_digits(tiny_data)
    with torch.no_grad():
        unflipped = model(scaled[0]).argmax(-1).numpy() == labels
        both = (model(scaled[0]) + model(scaled[1])).argmax(-1).numpy() == labels
    assert not np.array_equal(both, unflipped)  # the digits tell the two scorings apart
    assert run_records(out, "val") == run_records(tmp_path / "plain", "val")
    kept = weights(tmp_path / "plain" / "best.safetensors")
    assert all(torch.equal(t, kept[k]) for k, t in weights(out / "best.safetensors").items())
    assert (summary["tta"], summary["val_tta"]) == ("flip", "none")
    assert (plain["tta"], plain["val_tta"]) == ("none", "none")
    assert summary["test_accuracy"] == pytest.approx(np.mean(both), abs=1e-12)
    assert plain["test_accuracy"] == pytest.approx(np.mean(unflipped), abs=1e-12)


def test_run_folder_holds_what_a_person_reads(trained_run: Path) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "curves.png", "summary.json"} <= names
    assert {"last.safetensors", "best.safetensors"} <= names
    assert not [n for n in names if n.endswith("tmp")]  # .vitkit-tmp: unfinished writes
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["epochs"] == 12 and summary["classes"] == [str(d) for d in range(10)]
    assert 0 < summary["best_val_accuracy"] <= 1 and summary["wall_seconds"] > 0
    assert summary["images_per_second"] > 0
    val = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "val" for r in val) == 12
    assert json.loads((trained_run / "config.json").read_text())["schedule"]["epochs"] == 12
    with Image.open(trained_run / "curves.png") as png:
        assert png.size[0] > 100
    # Both checkpoints load with the ordinary loader; best is the best validation epoch.
    model = load_pretrained(trained_run / "best.safetensors")
    assert model.cfg.extra["classes"] == summary["classes"]


def test_each_lines_speed_is_that_of_its_own_steps(tiny_data: Path, tmp_path: Path) -> None:
    """One epoch of 8 steps of 32 images, a line per step; step 4 waits 2 s. A line's rate is
    bounded by what its steps did in the time they took: step 4's at most 32 images / 2 s; the
    run's mean (``summary.json``) at most 256 / 2 s, which the lines after the wait, each a
    step of a tiny model, beat by far (a running mean could not)."""

    def wait(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step == 4:
            time.sleep(2.0)

    summary = train(config(tiny_data, tmp_path / "run", epochs=1), step_hooks=[wait])
    rates = [r["images_per_second"] for r in run_records(tmp_path / "run")]
    assert len(rates) == 8
    assert rates[3] <= 32 / 2.0
    assert summary["images_per_second"] <= 256 / 2.0 < max(rates[4:])


# SGD, not Adam, where two runs must agree to 1e-5: the key projection's bias has a true
# gradient of zero (softmax ignores a constant added to every logit), and Adam divides its
# rounding noise by its own size, turning it into steps of +-lr that differ between runs.
EXACT = dict(optimizer="sgd", lr=0.05)


def test_gradient_accumulation_keeps_the_global_batch(tiny_data: Path, tmp_path: Path) -> None:
    train(config(tiny_data, tmp_path / "one", epochs=2, **EXACT))
    train(config(tiny_data, tmp_path / "acc", epochs=2, accum_steps=4, **EXACT))
    one, acc = (
        weights(tmp_path / "one/last.safetensors"),
        weights(tmp_path / "acc/last.safetensors"),
    )
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=0, atol=1e-5)


def test_a_profiled_run_shows_each_stage_of_the_loop(tiny_data: Path, tmp_path: Path) -> None:
    """The loop's labelled ranges, counted against the run's arithmetic: 256 training images
    (320 less a fifth for validation), batches of 32 in micro-batches of 16, one epoch."""
    from torch.profiler import ProfilerActivity, profile

    from vitkit.training.loop import STAGES

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train(config(tiny_data, tmp_path / "run", epochs=1, accum_steps=2))
    counts = {stage: 0 for stage in STAGES}
    for event in profiler.events():
        for stage, label in STAGES.items():
            counts[stage] += event.name == label
    steps = 256 // 32
    assert counts == {
        "data": 2 * steps,
        "augment": 2 * steps,
        "forward_backward": 2 * steps,
        "clip": steps,
        "optimizer": steps,
        "evaluate": 1,
        "checkpoint": 1,
    }


def test_bf16_autocast_trains(tiny_data: Path, tmp_path: Path) -> None:
    summary = train(config(tiny_data, tmp_path / "bf16", epochs=2, precision="bf16"))
    assert summary["precision"] == "bf16"
    records = run_records(tmp_path / "bf16")
    assert records[-1]["loss"] < records[0]["loss"]


# slow: waits for the C++ compiler; compile's own numerics are torch's, checked here against eager
@pytest.mark.slow
def test_compile_computes_what_eager_does(tiny_data: Path, tmp_path: Path) -> None:
    """--compile changes how the blocks run, not what they compute or what is saved."""
    short = dict(epochs=1, steps=3, evaluators=[], **EXACT)
    train(config(tiny_data, tmp_path / "eager", **short))
    train(config(tiny_data, tmp_path / "compiled", compile=True, **short))
    eager, compiled = run_records(tmp_path / "eager"), run_records(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-5)
    a, b = (
        weights(tmp_path / "eager/last.safetensors"),
        weights(tmp_path / "compiled/last.safetensors"),
    )
    assert a.keys() == b.keys()  # no torch.compile wrapper in the parameter names
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_compile_without_a_compiler_says_so(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(
        ValueError, match=r"--compile: torch\.compile does not work on this machine"
    ):
        train(config(tiny_data, tmp_path / "run", compile=True))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_patch_dropout_is_saved_with_the_model_and_drops_tokens_only_in_training(
    tiny_data: Path, tmp_path: Path
) -> None:
    train(config(tiny_data, tmp_path / "run", epochs=1, patch_dropout=0.5))
    model = load_pretrained(tmp_path / "run" / "best.safetensors")
    assert isinstance(model, VisionTransformer)
    assert model.cfg.patch_dropout == 0.5
    tokens_seen: list[int] = []
    model.blocks[0].register_forward_pre_hook(lambda _, args: tokens_seen.append(args[0].shape[1]))
    images = torch.randn(2, 1, 8, 8)
    model.train()(images)
    model.eval()(images)
    patches = model.cfg.grid[0] * model.cfg.grid[1]  # vit_digits: 4x4 patches of 2x2 px
    assert tokens_seen == [1 + patches // 2, 1 + patches]


# ---------------------------------------------------------------------- nothing lost


def test_resume_is_bit_identical(tiny_data: Path, tmp_path: Path) -> None:
    augment = dict(random_resized_crop=True, crop_scale=(0.5, 1.0), label_smoothing=0.1)
    cfg = dict(epochs=4, dropout=0.1, drop_path=0.1, patch_dropout=0.5, augment=augment)
    train(config(tiny_data, tmp_path / "whole", **cfg))

    # killed right after the 2nd epoch's checkpoint
    with interrupted_after_checkpoint(2), pytest.raises(TrainingInterrupted):
        train(config(tiny_data, tmp_path / "cut", **cfg))
    summary = train(resume=tmp_path / "cut")

    whole, resumed = (
        weights(tmp_path / "whole/last.safetensors"),
        weights(tmp_path / "cut/last.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert summary["steps"] == 4 * (256 // 32)
    # The metrics of the killed epochs are not repeated.
    steps = [r["step"] for r in run_records(tmp_path / "cut")]
    assert steps == sorted(set(steps))


@pytest.mark.slow  # test_engine's SIGKILL test does the same in 12 epochs, mid-epoch
def test_resume_after_sigkill(tiny_data: Path, tmp_path: Path) -> None:
    """The real thing: the CLI killed with SIGKILL mid-run, then ``--resume``, against the
    same run never interrupted (in this process, also on one thread)."""
    settings = dict(data=str(tiny_data), epochs=20, batch_size=32, warmup_epochs=1.0)
    train(TrainConfig.from_dict({**settings, "out": str(tmp_path / "whole")}))
    cut = tmp_path / "cut"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    command = [sys.executable, "-m", "vitkit", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sigkill_after_checkpoint([*command, *flags, "--out", str(cut)], cut, env, settle=0.2)
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    run_ok([*command, "--resume", str(cut)], env)
    whole, resumed = weights(tmp_path / "whole/last.safetensors"), weights(cut / "last.safetensors")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward = VisionTransformer.forward
    calls = []

    def poisoned(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            calls.append(1)
            if len(calls) > 8 + 3:  # 8 steps per epoch: NaN in the middle of epoch 2
                return forward(self, x) * float("nan")
        return forward(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(
        TrainingDiverged, match=r"nan at step 12: .*last.safetensors \(step 8, epoch 1\)"
    ):
        train(config(tiny_data, out))
    model = load_pretrained(out / "last.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = json.loads(
        __import__("safetensors")
        .safe_open(str(out / "last.safetensors"), "pt")
        .metadata()["vitkit_state"]
    )
    assert state["epoch"] == 1 and state["step"] == 8


# ------------------------------------------------------------- fine-tune, eval, predict


def test_finetune_at_a_higher_resolution_with_new_classes(
    trained_run: Path, tmp_path: Path
) -> None:
    # Five classes (digits 0-4) at 16x16: the head is new, the position embeddings resized.
    digits = load_dataset("digits", "train")
    keep = torch.nonzero(digits.labels < 5).flatten()[:200]
    data = tmp_path / "five.npz"
    np.savez(data, images=digits.images[keep].numpy(), labels=digits.labels[keep].numpy())
    code = main(
        [
            "finetune",
            "--from",
            str(trained_run / "best.safetensors"),
            "--data",
            str(data),
            "--img-size",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--val-fraction",
            "0",
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    assert code == 0
    model = load_pretrained(tmp_path / "ft/last.safetensors")
    assert model.cfg.img_size == (16, 16) and model.cfg.num_classes == 5
    assert model.pos_embed.weight.shape[1] == 1 + 8 * 8
    cfg = json.loads((tmp_path / "ft/config.json").read_text())
    optim = cfg["optim"]
    assert optim["name"] == "sgd" and optim["grad_clip"] == 1.0 and optim["weight_decay"] == 0
    # The encoder started from the checkpoint: its first block moved only a little.
    start = load_pretrained(trained_run / "best.safetensors")
    moved = (model.blocks[0].attn.qkv.weight - start.blocks[0].attn.qkv.weight).norm()
    assert moved < 0.5 * start.blocks[0].attn.qkv.weight.norm()


def test_eval_reports_the_summary_accuracy(
    trained_run: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = json.loads((trained_run / "summary.json").read_text())
    assert main(["eval", str(trained_run / "best.safetensors"), "--data", str(tiny_data)]) == 0
    correct = round(summary["test_accuracy"] * 100)
    assert f"({correct}/100)" in capsys.readouterr().out


def test_predict_names_the_digit(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5
    test_set = load_dataset("digits", "test")
    model = load_pretrained(trained_run / "best.safetensors")
    paths, labels = [], []
    for i in range(20):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(test_set.images[i, 0].numpy()).resize((32, 32)).save(path)
        paths.append(str(path))
        labels.append(str(int(test_set.labels[i])))
    assert main(["predict", str(trained_run / "best.safetensors"), *paths, "--top-k", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20
    top1_right = 0
    for line, label in zip(lines, labels, strict=True):
        fields = line.split(": ", 1)[1].split(", ")
        names = [f.split()[0] for f in fields]
        probs = [float(f.split()[1]) for f in fields]
        assert sorted(names) == [str(d) for d in range(10)]
        assert sum(probs) == pytest.approx(1.0, abs=0.01) and probs == sorted(probs, reverse=True)
        top1_right += names[0] == label
    assert top1_right >= 10
    del model


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "lr must be positive"),
        (["--warmup-epochs", "-1"], "warmup_epochs must be >= 0"),
        (["--model", "vit_nope"], "is not registered"),
        (["--data", "/nonexistent/data"], "does not exist"),
        (["--batch-size", "4096"], "training images: lower --batch-size"),
        (["--batch-size", "100", "--accum-steps", "3"], "divisible by accum_steps"),
        (["--label-smoothing", "1.5"], "label_smoothing must be in"),
        (["--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
    ],
)
def test_bad_input_is_rejected_before_training(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("vitkit train: error:")
    assert not out.exists()


def test_bad_toml_keys_and_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("epochs = 5\nlearning_rate = 0.1\n[augment]\nflip = true\n")
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "'learning_rate'" in err and "'augment.flip'" in err
    toml.write_text("epochs = 'five'\n")
    assert main(["train", "--config", str(toml)]) == 2
    toml.write_text("epochs = [\n")
    assert main(["train", "--config", str(toml)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_help_shows_every_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "MISSING" not in out
    assert "(default: 0.004)" in out and "(default: [])" in out  # --lr, --lr-drops


def test_run_folders_are_never_overwritten(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (trained_run / "last.safetensors").read_bytes()
    assert main(["train", "--out", str(trained_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained_run / "last.safetensors").read_bytes() == before
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained_run), "--epochs", "9"]) == 2
    assert "drop the other options (epochs)" in capsys.readouterr().err


def test_inference_errors(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = str(trained_run / "best.safetensors")
    assert main(["predict", ckpt, str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert main(["predict", ckpt, str(tmp_path / "junk.png")]) == 2
    assert "not an image Pillow can read" in capsys.readouterr().err
    three = tmp_path / "three.npz"
    np.savez(three, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4) % 3)
    assert main(["eval", ckpt, "--data", str(three)]) == 2
    assert "the data has 3 classes but the model predicts 10" in capsys.readouterr().err
    assert main(["finetune", "--from", str(tmp_path / "nope.safetensors")]) == 2
    assert "init_from" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DDP


# slow: test_parallel's runs show 2 DDP processes = 2 FSDP processes = 1 process, more cheaply
@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_data: Path, tmp_path: Path) -> None:
    """gloo, 2 processes x 16 images = 1 process x 32 images, step for step."""
    args = [
        "train",
        "--data",
        str(tiny_data),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--warmup-epochs",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--no-random-resized-crop",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_ok([*torchrun(2), "-m", "vitkit", *args, "--out", str(tmp_path / "ddp")], env)
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    ddp, single = (
        weights(tmp_path / "ddp/last.safetensors"),
        weights(tmp_path / "single/last.safetensors"),
    )
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=0, atol=1e-5)
    summaries = [json.loads((tmp_path / r / "summary.json").read_text()) for r in ("ddp", "single")]
    assert summaries[0]["processes"] == 2
    assert summaries[0]["confusion_matrix"] == summaries[1]["confusion_matrix"]


def test_single_split_source_holds_out_a_test_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An .npz of images/labels has no test split: the test images must not be trained on."""
    digits = load_dataset("digits", "train")
    path = tmp_path / "one_split.npz"
    np.savez(path, images=digits.images[:200].numpy(), labels=digits.labels[:200].numpy())
    with caplog.at_level(logging.WARNING):
        splits = open_splits(str(path), val_fraction=0, seed=0)
    assert "no separate test split" in caplog.text
    assert splits.val is None
    train_set, test_set = splits.train.dataset, splits.test.dataset
    assert len(train_set) + len(test_set) == 200
    assert len(test_set) == pytest.approx(40, abs=5)  # 20%, rounded per class (stratified)
    flat = [tuple(img.flatten().tolist()) for img in train_set.images]
    assert not {tuple(img.flatten().tolist()) for img in test_set.images} & set(flat)
