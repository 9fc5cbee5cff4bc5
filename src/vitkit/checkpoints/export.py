"""Write a vitkit model in any format vitkit reads back: ``export(model, path, to)``.

Files are written to a temporary name and renamed; folders are built in a temporary folder
that replaces ``path`` only once complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.checkpoints import bit, hf, official, timm
from vitkit.checkpoints.core import CheckpointError
from vitkit.checkpoints.model_card import CARD_FILE, model_card
from vitkit.checkpoints.native import save_pretrained
from vitkit.models.registry import architecture_of
from vitkit.utils.files import (
    TEMP_SUFFIX,
    current_umask,
    explain_os_error,
    make_parent,
    temp_name,
)

Writer = Callable[[Any, Path], object]
# Per format, the writer for each architecture it holds ("*": any registered architecture).
WRITERS: dict[str, dict[str, Writer]] = {
    "vitkit": {"*": save_pretrained},  # a folder, or one file when the path ends in .safetensors
    "timm": {"vit": timm.write, "resnetv2": bit.write_timm},  # .safetensors, .pth, .pt or .bin
    "official": {"vit": official.write},  # .npz
    "bit": {"resnetv2": bit.write_bit},  # .npz
    "hf": {"vit": hf.write},  # a folder
}
EXPORT_FORMATS = tuple(WRITERS)
# The folder formats that are Hub repos, and the library that loads each: they get a model card.
HUB_LIBRARIES = {"hf": "transformers", "timm": "timm"}


def writes_folder(path: Path, to: str) -> bool:
    if to == "timm":  # a state-dict file, else timm's hub folder
        return path.suffix not in timm.SUFFIXES
    return to == "hf" or (to == "vitkit" and path.suffix != ".safetensors")


def atomic_dir(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_folder)``, then put the folder at ``path`` (replacing an old one)."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder")
    make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_name(path), suffix=TEMP_SUFFIX))
    except OSError as err:
        raise explain_os_error(err, path, None) from None
    try:
        try:
            write(tmp)
        except OSError as err:  # name the file in ``path``, not in its temporary folder
            if err.filename is not None and str(err.filename).startswith(str(tmp)):
                inside = Path(err.filename).relative_to(tmp)
                raise type(err)(err.errno, err.strerror, str(path / inside)) from None
            raise
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        if path.exists():
            # A crash between the two renames leaves the old folder here, under a name that
            # remove_stale_temps does not match: it is then the only copy.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_name(path), suffix=".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(
    model: nn.Module,
    path: str | Path,
    to: str,
    run: str | Path | None = None,
    card: bool | None = None,
    repo: str | None = None,
) -> Path:
    """Write ``model`` at ``path`` in format ``to`` (one of ``EXPORT_FORMATS``).

    vitkit's format takes a model of any registered architecture, the others the
    architectures listed for them in ``WRITERS``. A folder gets a model card (``README.md``,
    ``vitkit.checkpoints.model_card``) when ``card`` is true; by default (None) the Hub's
    folder formats do (``--to hf``, and ``--to timm`` to a folder). ``run`` is the run folder
    the model comes from: its test accuracy and training config go into the card; ``repo``
    (``ORG/NAME``) the Hub repo it is written for, named in the card's usage snippet.
    """
    path = Path(path)
    if to not in WRITERS:
        raise CheckpointError(f"unknown export format {to!r}; choose one of {EXPORT_FORMATS}")
    architecture = architecture_of(model).name
    writers = WRITERS[to]
    write = writers.get(architecture) or writers.get("*")
    if write is None:
        raise CheckpointError(
            f"the {to} format holds {' and '.join(writers)} models; this is a {architecture!r} "
            "model: write it with --to vitkit"
        )
    if writes_folder(path, to):
        library = HUB_LIBRARIES.get(to, "vitkit")
        with_card = to in HUB_LIBRARIES if card is None else card

        def write_folder(tmp: Path) -> None:
            write(model, tmp)
            if with_card:
                text = model_card(model.cfg, library, Path(run) if run else None, repo)
                (tmp / CARD_FILE).write_text(text)

        atomic_dir(path, write_folder)
    else:
        write(model, path)
    return path
