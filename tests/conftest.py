"""Shared test fixtures and helpers: where the reference data lives, deterministic seeds, one
thread for tiny models, small slices of the shipped digits, tiny training configs, perturbed
models, and runs that are killed or interrupted on purpose."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from vitkit.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BUNDLED_REFERENCE = REPO / "tests" / "fixtures" / "official_vit"


def reference_dir() -> Path:
    """The official-code fixtures: $VITKIT_REFERENCE, else ../shared/reference/official_vit."""
    return Path(
        os.environ.get("VITKIT_REFERENCE", REPO.parent / "shared" / "reference" / "official_vit")
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models and small solves gain nothing from a second thread, and the other tests
    share the cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """``tiny_digits(train, test)``: the first ``train`` training and ``test`` test digits as an
    ``.npz`` (a format ``load_dataset`` reads), written once per size."""
    from vitkit.data import load_dataset

    made: dict[tuple[int, int], Path] = {}

    def make(train: int, test: int) -> Path:
        if (train, test) not in made:
            train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
            path = tmp_path_factory.mktemp("digits") / f"digits_{train}_{test}.npz"
            np.savez(
                path,
                x_train=train_set.images[:train].numpy(),
                y_train=train_set.labels[:train].numpy(),
                x_test=test_set.images[:test].numpy(),
                y_test=test_set.labels[:test].numpy(),
            )
            made[train, test] = path
        return made[train, test]

    return make


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` exists or ``proc`` has ended (then the test's own assertions fail), with
    no clock: a slow machine makes the test slower, never red."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)


def sigkill_after_checkpoint(
    command: list[str], out: Path, env: dict[str, str], settle: float
) -> None:
    """Run ``command`` (a training run writing to ``out``) and SIGKILL it ``settle`` seconds
    after its first checkpoint: somewhere in a later epoch, or while a checkpoint is written."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "last.safetensors", proc)
    time.sleep(settle)
    proc.kill()
    proc.wait()


def train_config(
    settings: Mapping[str, object], data: Path, out: Path, **overrides: object
) -> TrainConfig:
    """A ``TrainConfig`` of a test file's tiny ``settings`` on ``data``, written to ``out``;
    ``overrides`` replace settings. Settings are named by their flags (``lr``, ``steps``), as
    the shorthand of a test, and placed in their sections. A test file binds its own settings
    once: ``config = functools.partial(train_config, TINY)``."""
    from vitkit.training import TrainConfig
    from vitkit.training.config import nest_flat_keys

    flat = {**settings, "data": str(data), "out": str(out), **overrides}
    return TrainConfig.from_nested(nest_flat_keys(flat)[0])


def run_records(run: Path, split: str = "train") -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records of one split of a run folder, in order."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


Module = TypeVar("Module", bound=nn.Module)


def perturbed(model: Module, seed: int = 0, scale: float = 0.02) -> Module:
    """Add noise to every parameter (as the official fixtures do), so no gradient or output is
    trivially 0: a zero-initialised head, mask token or GroupNorm scale would block them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@contextmanager
def interrupted_after_checkpoint(
    count: int, method: str = "save_checkpoint"
) -> Iterator[list[int]]:
    """Within the block, a Ctrl-C (``KeyboardInterrupt``) right after a run writes its
    ``count``-th checkpoint with ``RunFolder.<method>``; yields the steps of the checkpoints
    written so far (filled as the run goes). On leaving, checkpoints are saved as usual again
    (for the ``--resume``)."""
    from vitkit.training.run import RunFolder

    save = getattr(RunFolder, method)
    steps: list[int] = []

    def save_then_die(self: RunFolder, *args: Any, **kwargs: Any) -> None:
        save(self, *args, **kwargs)
        steps.append(
            inspect.signature(save).bind(self, *args, **kwargs).arguments["loop_state"]["step"]
        )
        if len(steps) == count:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunFolder, method, save_then_die)
        yield steps


def assert_cut_run_resumes_to(whole: Path, cut: TrainConfig) -> None:
    """Train ``cut``, killed after its second checkpoint, resume it, and check that it ends
    with the same weights and training state as the unbroken run in ``whole``."""
    from safetensors.torch import load_file

    from vitkit.training import TrainingInterrupted, train

    with interrupted_after_checkpoint(2), pytest.raises(TrainingInterrupted):
        train(cut)
    train(resume=cut.run.out)
    expected = load_file(str(whole / "last.safetensors"))
    resumed = load_file(str(Path(cut.run.out) / "last.safetensors"))
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def publish_to_hub_cache(cache: Path, repo_id: str, folder: Path, ref: str = "main") -> None:
    """Put ``folder`` into the Hugging Face cache ``cache`` (``HF_HUB_CACHE``) as repository
    ``repo_id``'s snapshot, ``ref`` (a branch or tag) naming it: what a download would have
    left there, so that ``hf-hub:`` names resolve with ``HF_HUB_OFFLINE=1``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / HUB_COMMIT, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(HUB_COMMIT)


def torchrun(processes: int, *extra: str) -> list[str]:
    """The command that starts ``processes`` processes on this machine under torchrun, followed
    by ``extra`` (torchrun's own options, then the script or ``-m MODULE``)."""
    standalone = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*standalone, "--nproc-per-node", str(processes), *extra]
