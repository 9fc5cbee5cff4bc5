"""vitkit's own format: safetensors weights plus the ``ViTConfig`` as JSON.

Two shapes of the same thing:
- a folder with ``config.json`` and ``model.safetensors`` (what ``save_pretrained`` writes for
  a directory path, like Hugging Face's layout);
- one ``.safetensors`` file whose metadata holds the config under ``vitkit_config``. Training
  checkpoints use this shape and add their optimizer, scheduler and RNG state as tensors under
  ``state/`` and JSON under the metadata key ``vitkit_state``; model loading ignores both.

Everything is written to a temporary file first and then renamed, so a crash never leaves a
half-written checkpoint where a good one was. The temporary file sits visibly beside its target
as ``NAME.PID-XXXXXXXX.vitkit-tmp``; one left by a killed process is removed by the next write
to that folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
    build_model,
    register_format,
)
from vitkit.models.vit import VisionTransformer, ViTConfig

CONFIG_KEY = "vitkit_config"
STATE_PREFIX = "state/"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TEMP_SUFFIX = ".vitkit-tmp"
_TEMP_NAME = re.compile(r".+\.(\d+)-[a-z0-9_]+" + re.escape(TEMP_SUFFIX))
_STARTED = time.time()  # temporary files last touched before this are not this process's

logger = logging.getLogger(__name__)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(path: Path) -> str:
    """The prefix of ``path``'s temporary names: visible, and with the writer's process id
    so that ``remove_stale_temps`` can tell a killed writer's leftovers from a live one's."""
    return f"{path.name}.{os.getpid()}-"


def _is_stale(entry: os.DirEntry) -> bool:
    """A temporary file or folder whose writer is gone: its process id is not running here
    (or is ours) and it was last modified before this process started, so no write that is
    still going on (here or, on a shared file system, on another machine) can own it."""
    match = _TEMP_NAME.fullmatch(entry.name)
    if match is None:
        return False
    pid = int(match[1])
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
            return False  # that process is running
        except ProcessLookupError:
            pass
        except PermissionError:
            return False  # running, as another user
    return entry.stat(follow_symlinks=False).st_mtime < _STARTED


def remove_stale_temps(folder: Path) -> None:
    """Delete what killed writes left in ``folder``; best effort, never failing a write."""
    try:
        stale = [e for e in os.scandir(folder) if _is_stale(e)]
    except OSError:
        return
    for entry in stale:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            logger.info("removed %s, left by an interrupted write", entry.path)
        except OSError:
            pass


def explain_os_error(err: OSError, path: Path, size: int | None) -> OSError:
    """``err`` naming ``path`` (not its temporary name) and, for a full disk, the space
    needed and free, so the one line the CLI prints says what to do."""
    if err.errno is None:
        return err
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 1e6:,.1f} MB are free there"
        except OSError:
            free = "free space unknown"
        needed = f"it needs {size / 1e6:,.1f} MB, " if size is not None else ""
        reason = f"{reason} ({needed}{free})"
    return type(err)(err.errno, reason, str(path))


def make_parent(path: Path) -> None:
    """Create ``path``'s folder, with one clear error when a file stands in its place, and
    remove the leftovers of killed writes there."""
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path``.

    ``size`` (bytes, when known) is reported if the disk fills up. Leftovers of killed
    writes in the same folder are removed first.
    """
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path), suffix=TEMP_SUFFIX)
    except OSError as err:
        raise explain_os_error(err, path, size) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise explain_os_error(err, path, size) from None
        raise


def save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Atomically write tensors (made contiguous, storage not shared) and string metadata."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size)


def save_pretrained(
    model: VisionTransformer,
    path: str | Path,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` as a folder, or as one file when ``path`` ends in ``.safetensors``.

    ``extra_tensors`` (stored under ``state/``) and ``extra_metadata`` only fit the one-file
    shape; training checkpoints use them.
    """
    path = Path(path)
    config_json = json.dumps(model.cfg.to_dict(), sort_keys=True)
    weights = dict(model.state_dict())
    if path.suffix == ".safetensors":
        extra = {STATE_PREFIX + k: v for k, v in (extra_tensors or {}).items()}
        save_safetensors(
            path, {**weights, **extra}, {CONFIG_KEY: config_json, **(extra_metadata or {})}
        )
        return path
    if extra_tensors or extra_metadata:
        raise ValueError("training state can only be saved in the one-file (.safetensors) shape")
    save_safetensors(path / WEIGHTS_FILE, weights, {CONFIG_KEY: config_json})
    atomic_write(
        path / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2))
    )
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


def detect(path: Path) -> bool:
    weights = _weights_file(path)
    if weights.suffix != ".safetensors" or not weights.is_file():
        return False
    try:
        return CONFIG_KEY in read_metadata(weights)
    except CheckpointError:
        return True  # a broken .safetensors file (alone or in a folder): let read() report it


def read(path: Path, spec: ModelSpec = None) -> Checkpoint:
    weights = _weights_file(path)
    metadata = read_metadata(weights)
    try:
        config = ViTConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{weights}: its vitkit config is missing or invalid ({err})"
        ) from None
    tensors = load_tensors(weights)
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    dropped = sorted(k for k in tensors if k.startswith(STATE_PREFIX))
    dropped += sorted(f"metadata {k}" for k in metadata if k != CONFIG_KEY)
    return Checkpoint(config, state_dict, "vitkit", dropped=dropped)


def from_pretrained(path: str | Path) -> VisionTransformer:
    """Read back what ``save_pretrained`` wrote, bit-exactly."""
    return build_model(read(Path(path)))


register_format(CheckpointFormat("vitkit", detect, read))
