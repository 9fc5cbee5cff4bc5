"""One run of an experiment, trained once: what lets an experiment of many runs be killed and
run again with the same command, continuing where it stopped.

A run folder with a ``summary.json`` is finished and read back, one with a checkpoint is
resumed from it, an empty one is trained, and one killed before its first checkpoint is
trained again from its first step (its logged steps are dropped: nothing saved continues
them); a folder that holds a run with other settings is refused rather than mixed into the
results.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from vitkit.training import RunFolder, TrainConfig, train
from vitkit.training.config import read_run_config
from vitkit.training.loop import Progress
from vitkit.utils.files import atomic_write

logger = logging.getLogger(__name__)

STUDY_FILE = "study.json"  # a study's settings, beside its run folders
FEWSHOT_FILE = "fewshot.json"  # a model's few-shot scores, in its run folder


def finished_run(
    cfg: TrainConfig,
    ignore: Collection[str] = (),
    progress: Callable[[], AbstractContextManager[Progress | None]] | None = None,
) -> dict[str, Any]:
    """The summary of the run ``cfg`` describes (in its ``run.out``): read back if finished,
    else resumed or trained. ``ignore`` lists settings (dotted paths) a reused folder may hold
    differently; ``progress()`` gives a context holding a progress callback for the run."""
    if not cfg.run.out:
        raise ValueError("an experiment's run needs its folder: set run.out")
    run = RunFolder(Path(cfg.run.out))
    check_same_settings(run, cfg, set(ignore))
    if run.summary.is_file():
        logger.info("%s is finished: reading its summary", run.path)
    else:
        with progress() if progress is not None else nullcontext() as callback:
            if run.holds_run():
                if run.latest_checkpoint() is None and not run.best.is_file():
                    logger.info("%s stopped before its first checkpoint: from step 0", run.path)
                    run.cut_metrics(0)
                else:
                    logger.info("resuming the unfinished run in %s", run.path)
                train(resume=run.path, progress=callback)
            else:
                train(cfg, progress=callback)
    summary: dict[str, Any] = json.loads(run.summary.read_text())
    return summary


def check_same_settings(run: RunFolder, cfg: TrainConfig, ignore: set[str]) -> None:
    """Refuse to reuse a run folder trained with other settings than the experiment's now."""
    if not run.holds_run():
        return
    saved = dotted(read_run_config(run.config).to_dict())
    wanted = dotted(json.loads(json.dumps(cfg.to_dict())))
    shown = differing_settings(saved, wanted, {*ignore, "run.out"})
    if shown:
        raise ValueError(
            f"{run.path} holds a run with other settings ({shown}): give another --out, or "
            "delete that folder to train it again"
        )


def claim_study(out: Path, settings: dict[str, Any]) -> None:
    """Write a study's ``settings`` into ``out`` (``STUDY_FILE``), or refuse an ``out`` whose
    saved settings differ: its run folders name their data by paths inside ``out``, so another
    study's runs must not be read back as this one's."""
    saved = out / STUDY_FILE
    if saved.is_file():
        shown = differing_settings(json.loads(saved.read_text()), settings)
        if shown:
            raise ValueError(
                f"{out} holds a study with other settings ({shown}): give another --out, or "
                "delete that folder to run it again"
            )
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=2) + "\n"
    atomic_write(saved, lambda tmp: tmp.write_text(text))


def kept_result(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``'s result (JSON-able, string keys), computed once and kept in ``path``: a
    continued study reads it back rather than compute it again (a few-shot reading of a model
    takes minutes on a CPU)."""
    if path.is_file():
        kept: dict[str, Any] = json.loads(path.read_text())
        return kept
    found = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(found, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return found


def differing_settings(
    saved: dict[str, Any], wanted: dict[str, Any], ignore: Collection[str] = ()
) -> str:
    """The settings ``wanted`` gives otherwise than ``saved`` (``ignore`` aside), as
    ``"key: saved there, wanted now; ..."``; empty when they agree."""
    differing = sorted(
        k for k in wanted.keys() - set(ignore) if not same_setting(saved.get(k), wanted[k])
    )
    return "; ".join(f"{k}: {saved.get(k)!r} there, {wanted[k]!r} now" for k in differing)


def same_setting(saved: Any, wanted: Any) -> bool:
    """Equal, or two spellings of one existing file or folder (relative and absolute, or
    through a link): a study continued with ``--out`` or its data spelled otherwise is the
    same study, and its run folders, which name their data and checkpoints by paths inside
    ``--out``, are the same runs."""
    if saved == wanted:
        return True
    if not (isinstance(saved, str) and isinstance(wanted, str)):
        return False
    try:
        return os.path.samefile(saved, wanted)
    except (OSError, ValueError):  # a path that does not exist, or a string that is no path
        return False


def dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config's values by dotted path (``optim.lr``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
