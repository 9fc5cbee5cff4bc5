"""Shared test fixtures: where the reference data lives, deterministic seeds, one thread for
tiny models, and small slices of the shipped digits."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

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
            np.savez(path, x_train=train_set.images[:train].numpy(),
                     y_train=train_set.labels[:train].numpy(),
                     x_test=test_set.images[:test].numpy(), y_test=test_set.labels[:test].numpy())  # fmt: skip
            made[train, test] = path
        return made[train, test]

    return make


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` exists or ``proc`` has ended (then the test's own assertions fail), with
    no clock: a slow machine makes the test slower, never red."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)


def sigkill_after_checkpoint(command: list[str], out: Path, env: dict[str, str],
                             settle: float) -> None:  # fmt: skip
    """Run ``command`` (a training run writing to ``out``) and SIGKILL it ``settle`` seconds
    after its first checkpoint: somewhere in a later epoch, or while a checkpoint is written."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(out / "last.safetensors", proc)
    time.sleep(settle)
    proc.kill()
    proc.wait()
