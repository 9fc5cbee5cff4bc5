"""Hostile input and a hostile system: corrupt images, truncated shards, a killed pack, a full
disk, a pre-training run folder given as a checkpoint, and the noise of the ONNX exporter
(docs/reliability.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vitkit.checkpoints import load_pretrained
from vitkit.cli import main


def test_finetune_from_a_pretrain_run_folder(
    tiny_digits: Callable[[int, int], Path], tmp_path: Path
) -> None:
    data = str(tiny_digits(64, 32))
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert main(["pretrain", "--data", data, "--steps", "2", "--batch-size", "16",
                 "--eval-every", "2", "--out", str(pre)]) == 0  # fmt: skip
    assert main(["finetune", "--from", str(pre), "--data", data, "--steps", "2",
                 "--batch-size", "16", "--out", str(fine)]) == 0  # fmt: skip
    assert json.loads((fine / "config.json").read_text())["init_from"] == str(pre)
    assert load_pretrained(pre).cfg.num_classes != 10  # the pre-training head (MPP)...
    assert load_pretrained(fine).cfg.num_classes == 10  # ...replaced by the digits' classes
