"""The names of the files in a run folder, shared by what writes them and what reads them.

    config.json        the resolved training config
    metrics.jsonl      one JSON line per logged training step and per evaluation
    last.safetensors   the model after the latest checkpoint, plus the training state to resume
    best.safetensors   the same, for the best evaluation so far
    last.dcp/          an FSDP run's last checkpoint, sharded: one file per process
                       (best.safetensors and, at the end, last.safetensors hold its model whole)
    curves.png         the logged metrics against the step
    summary.json       test results and timing
    skipped_files.txt  every unreadable file skipped, with its reason (only when there were)

Training writes a run folder and analysis reads one; keeping the names here, below both, lets
analysis find the files without importing the training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitkit.utils.remote import resolve_checkpoint


class RunLayout:
    """The paths of one run folder's files (nothing is read or written here)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.last = self.path / "last.safetensors"
        self.best = self.path / "best.safetensors"
        self.sharded_last = self.path / "last.dcp"
        self.curves = self.path / "curves.png"
        self.summary = self.path / "summary.json"
        self.skipped = self.path / "skipped_files.txt"

    def holds_run(self) -> bool:
        """Whether a run was started here (its config is written before anything else)."""
        return self.config.is_file()

    def checkpoint(self) -> Path | None:
        """The checkpoint that stands for the run: the best, else the last; None if neither
        was written yet."""
        return next((c for c in (self.best, self.last) if c.is_file()), None)


def locate_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """The checkpoint to load and the run folder it belongs to (None for a lone checkpoint).

    ``path`` may be a run folder (its best checkpoint is used, else its last), a checkpoint
    inside a run folder, or any checkpoint ``load_pretrained`` reads, by name too
    (``hf-hub:ORG/NAME``, a URL: fetched first, see ``vitkit.utils.remote``).
    """
    path = resolve_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint or run folder {path} does not exist")
    if path.is_dir():
        run = RunLayout(path)
        checkpoint = run.checkpoint()
        if checkpoint is not None:
            return checkpoint, path
        if run.metrics.is_file() or run.summary.is_file():
            raise FileNotFoundError(
                f"{path} looks like a run folder but holds neither {run.best.name} nor "
                f"{run.last.name}"
            )
        return path, None
    run = RunLayout(path.parent)
    return path, run.path if run.metrics.is_file() or run.summary.is_file() else None


__all__ = ["RunLayout", "locate_checkpoint"]


def run_setting(
    config: dict[str, Any], section: str, key: str, flat_key: str | None = None, default: Any = None
) -> Any:
    """A setting of a run's ``config.json``: ``[section] key`` of the nested config, or, in the
    flat config of earlier versions, ``flat_key`` (default: the section's own name, which held
    the section's main value: ``model``, ``data``). Lets the layers below training read a run's
    settings without importing its config classes."""
    table = config.get(section)
    if isinstance(table, dict):
        return table.get(key, default)
    return config.get(flat_key or section, default)
