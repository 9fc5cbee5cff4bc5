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


def writes_folder(path: Path, to: str) -> bool:
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


def export(model: nn.Module, path: str | Path, to: str) -> Path:
    """Write ``model`` at ``path`` in format ``to`` (one of ``EXPORT_FORMATS``).

    vitkit's format takes a model of any registered architecture, the others the
    architectures listed for them in ``WRITERS``.
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
        atomic_dir(path, lambda tmp: write(model, tmp))
    else:
        write(model, path)
    return path
