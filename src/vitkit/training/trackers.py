"""Experiment trackers (``--log-to tensorboard``, ``--log-to mlflow``): copies of the run's
metrics for the tools people watch runs in.

``metrics.jsonl`` stays the source of truth: a tracker receives each line as it is appended
(``RunFolder.log``) and the step a resumed or rolled-back run goes back to
(``RunFolder.cut_metrics``), and writes what it can of them. Every numeric value of a line
becomes a scalar named ``<split>/<key>`` (``train/loss``, ``train/lr``, ``val/accuracy``, ...)
at the line's optimizer step; the resolved config goes along as hyper-parameters. Only the
main process tracks.

- TensorBoard: torch's ``SummaryWriter``, event files in ``<run>/tensorboard/``. Going back
  to a step starts a new event file with ``purge_step``, so TensorBoard drops what the
  earlier files logged after it: what it shows equals ``metrics.jsonl``.
- MLflow: a local file store in ``<run>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` is set; the
  MLflow run's id is kept in ``<run>/mlflow_run_id`` so a resumed run logs into the same
  MLflow run. MLflow cannot delete logged values: steps logged again after a resume get a
  second, later value (the latest value of each step equals ``metrics.jsonl``).

Both libraries are optional (``pip install 'vitkit[tracking]'``) and imported only when a
run asks for them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vitkit.training.run import RunFolder

TRACKERS = ("tensorboard", "mlflow")  # the choices of ``[run] log_to``
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}  # what each one needs
INSTALL_HINT = "pip install 'vitkit[tracking]'"


class Tracker(Protocol):
    """Where a run's metrics are copied to, beside ``metrics.jsonl``."""

    def log(self, record: Mapping[str, Any]) -> None:
        """One line of ``metrics.jsonl``."""

    def rewind(self, step: int) -> None:
        """The lines after ``step`` are dropped: the run logs them again."""

    def close(self, failed: bool = False) -> None:
        """The run ended (``failed``: with an exception)."""


def scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(``<split>/<key>``, value) for each number of a metrics line but its step and split."""
    split = record.get("split", "train")
    for key, value in record.items():
        if key not in ("split", "step") and isinstance(value, int | float):
            yield f"{split}/{key}", float(value)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` as ``{"optim.lr": 1e-3}``; lists and None as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def missing_package(tracker: str) -> ValueError:
    return ValueError(f"--log-to {tracker} needs {PACKAGES[tracker]}: {INSTALL_HINT}")


class TensorBoardTracker:
    """Scalars and the config (as text and as hyper-parameters) in ``<run>/tensorboard/``."""

    def __init__(self, folder: Path, config: Mapping[str, Any], start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard") from None
        self.folder = folder
        self.writer_class = SummaryWriter
        fresh = not folder.exists()  # a resumed run logged its config already
        self.writer = self.open(start_step)
        if fresh:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
            params = flatten(config)
            # add_hparams writes its own event file in a subfolder; no metrics go with it.
            self.writer.add_hparams(params, {}, run_name="hparams")

    def open(self, start_step: int) -> Any:
        """A writer whose event file drops what earlier files logged after ``start_step``."""
        return self.writer_class(str(self.folder), purge_step=start_step + 1)

    def log(self, record: Mapping[str, Any]) -> None:
        for name, value in scalars(record):
            self.writer.add_scalar(name, value, global_step=record["step"])
        self.writer.flush()

    def rewind(self, step: int) -> None:
        self.writer.close()
        self.writer = self.open(step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    """Params (the flattened config) and per-step metrics in an MLflow run."""

    def __init__(self, run_folder: Path, config: Mapping[str, Any], start_step: int) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_package("mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow's file store, the one mlflow-skinny writes without a database; MLflow 3
            # asks for this variable before it uses one.
            uri = (run_folder / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_folder / "mlflow_run_id"
        if id_file.is_file():  # a resumed run: the same MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("vitkit")
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment("vitkit")
            )
            name = run_folder.resolve().name
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            id_file.write_text(self.run_id + "\n")
        # A logged param cannot change: a resumed run adds only the keys that are new.
        logged = self.client.get_run(self.run_id).data.params
        for key, value in flatten(config).items():
            if key not in logged:
                self.client.log_param(self.run_id, key, value)

    def log(self, record: Mapping[str, Any]) -> None:
        for name, value in scalars(record):
            self.client.log_metric(self.run_id, name, value, step=record["step"])

    def rewind(self, step: int) -> None:
        """Nothing to drop: MLflow keeps every value; the steps logged again come later."""

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@contextmanager
def tracking(
    names: list[str], run: RunFolder, config: Mapping[str, Any], start_step: int = 0
) -> Iterator[None]:
    """Copy what ``run`` logs to the trackers ``names`` (of ``TRACKERS``; none on processes
    other than the main one) while the block runs: ``config`` is the run's resolved config,
    ``start_step`` the step it continues after (0 for a new run)."""
    trackers: list[Tracker] = []
    if run.writer and "tensorboard" in names:
        trackers.append(TensorBoardTracker(run.path / "tensorboard", config, start_step))
    if run.writer and "mlflow" in names:
        trackers.append(MlflowTracker(run.path, config, start_step))
    run.trackers = trackers
    failed = True
    try:
        yield
        failed = False
    finally:
        run.trackers = []
        for tracker in trackers:
            tracker.close(failed)
