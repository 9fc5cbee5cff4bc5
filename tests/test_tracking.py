"""``--log-to tensorboard`` and ``--log-to mlflow``: what the trackers hold, read back with each
library's own reader, equals ``metrics.jsonl``, also across a resume that logs steps again."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import train_config
from vitkit.training import TrainingInterrupted, train

TINY = dict(
    epochs=3,
    batch_size=32,
    lr=3e-3,
    warmup_epochs=0.5,
    log_every=1,
    val_fraction=0.25,
    augment=dict(random_resized_crop=False),
)
config = partial(train_config, TINY)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_data(tiny_digits: Callable[[int, int], Path]) -> Path:
    """128 training (a quarter of them validation: 2 steps an epoch) and 40 test digits."""
    return tiny_digits(128, 40)


def interrupted_then_resumed(cfg: Any, at_step: int) -> Path:
    """Train ``cfg``, stopped by a Ctrl-C after step ``at_step`` (lines logged after the last
    checkpoint, which the resumed run logs again), then resumed to its end."""

    def stop(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(cfg, step_hooks=[stop])
    train(resume=cfg.run.out)
    return Path(cfg.run.out)


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """``<split>/<key>`` -> {step: value} of every number in metrics.jsonl."""
    expected: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("split", "step") and isinstance(value, int | float):
                expected.setdefault(f"{record['split']}/{key}", {})[record["step"]] = value
    return expected


def test_tensorboard_event_files_equal_metrics_across_a_resume(
    tiny_data: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = interrupted_then_resumed(
        config(tiny_data, tmp_path / "run", log_to=["tensorboard"]), at_step=4
    )
    events = EventAccumulator(str(run / "tensorboard"))  # purges what a resume logged again
    events.Reload()
    expected = expected_scalars(run)
    assert {"train/loss", "train/lr", "train/images_per_second", "val/accuracy"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx(values, rel=1e-6), tag
    # The resolved config, once, as text (and as hyper-parameters in a folder of its own).
    (config_text,) = events.Tensors("config/text_summary")
    text = config_text.tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == json.loads((run / "config.json").read_text())
    assert list((run / "tensorboard/hparams").glob("events.out.tfevents.*"))


def test_mlflow_params_and_metric_history_equal_metrics_across_a_resume(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # vitkit sets it for its store
    run = interrupted_then_resumed(
        config(tiny_data, tmp_path / "run", log_to=["mlflow"]), at_step=4
    )
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    run_id = (run / "mlflow_run_id").read_text().strip()
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert len(client.search_runs([logged.info.experiment_id])) == 1  # the resume's too

    def dotted(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
        """The config's values by dotted key, as MLflow keeps params: text (lists as JSON)."""
        flat: dict[str, str] = {}
        for key, value in table.items():
            if isinstance(value, dict):
                flat |= dotted(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = (
                    json.dumps(value) if value is None or isinstance(value, list) else str(value)
                )
        return flat

    assert logged.data.params == dotted(json.loads((run / "config.json").read_text()))
    expected = expected_scalars(run)
    assert set(logged.data.metrics) == set(expected)
    for tag, values in expected.items():
        history = sorted(client.get_metric_history(run_id, tag), key=lambda m: m.timestamp)
        latest = {m.step: m.value for m in history}  # a step logged again: its later value
        assert latest == pytest.approx(values, rel=1e-12), tag
    # The step between the checkpoint at step 2 and the Ctrl-C was logged twice, nothing else.
    assert len(client.get_metric_history(run_id, "train/loss")) == len(expected["train/loss"]) + 1


def test_mlflow_tracking_uri_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from vitkit.training.trackers import MlflowTracker

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store of the test's own
    (tmp_path / "run").mkdir()
    tracker = MlflowTracker(tmp_path / "run", {"optim": {"lr": 0.5}}, 0)
    tracker.log({"split": "val", "step": 7, "accuracy": 0.25})
    tracker.close()
    assert not (tmp_path / "run/mlruns").exists()
    saved = MlflowClient(tracking_uri=store).get_run(tracker.run_id)
    assert saved.data.params == {"optim.lr": "0.5"} and saved.data.metrics == {"val/accuracy": 0.25}


@pytest.mark.parametrize(
    ("tracker", "module", "package"),
    [
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
        ("mlflow", "mlflow", "mlflow-skinny"),
    ],
)
def test_a_missing_tracker_package_is_named_with_the_extra(
    tracker: str,
    module: str,
    package: str,
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vitkit.cli import main

    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    flags = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main([*flags, "--log-to", tracker]) != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--log-to {tracker} needs {package}: pip install 'vitkit[tracking]'" in error


def test_an_unknown_tracker_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"log_to \['wandb'\]: choose from"):
        config(tiny_data, tmp_path / "run", log_to=["wandb"])
