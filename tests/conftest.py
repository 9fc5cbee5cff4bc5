"""Shared test fixtures: where the reference data lives, and deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

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
