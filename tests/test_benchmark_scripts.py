"""Every script of ``benchmarks/`` answers ``--help`` (argparse formats each option's help
when asked, so a stray ``%`` in it only fails then)."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_the_script_prints_its_help(
    script: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_paired_pilots_runs_every_arm_at_once_with_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two arms of the digits recipe, a few seconds each: each run folder holds the recipe
    with its arm's flags, each process had its share of the cores, and the table reports
    what each run wrote."""
    script = BENCHMARKS / "paired_pilots.py"
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    arms = ["recipe=", "fast=--lr 0.01 --batch-size 64"]
    argv = [str(script), "digits", "--minutes", "0.05", "--seed", "3", "--out", str(tmp_path)]
    for arm in arms:
        argv += ["--arm", arm]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    table = capsys.readouterr().out
    configs = {
        name: json.loads((tmp_path / name / "config.json").read_text())
        for name in ("recipe", "fast")
    }
    assert configs["recipe"]["optim"]["lr"] == 4e-3  # benchmarks/recipes/digits.toml
    assert configs["recipe"]["optim"]["batch_size"] == 128
    assert (configs["fast"]["optim"]["lr"], configs["fast"]["optim"]["batch_size"]) == (0.01, 64)
    for config in configs.values():
        assert config["schedule"]["max_minutes"] == 0.05 and config["run"]["seed"] == 3
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"2 arms of {threads} thread(s) at once" in table
    for name, flags in (("recipe", "(the recipe)"), ("fast", "--lr 0.01 --batch-size 64")):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        line = next(row for row in table.splitlines() if row.startswith(f"| {name} "))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1:4] == [
            flags,
            f"{summary['steps']:,}",
            f"{summary['images_per_second']:.0f}",
        ]
        assert cells[5] == f"{summary['test_accuracy']:.2%}"
