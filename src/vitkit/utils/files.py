"""Atomic file writes: a crash never leaves a half-written file where a good one was.

The temporary file sits visibly beside its target as ``NAME.PID-XXXXXXXX.vitkit-tmp``; one
left by a killed process is removed by the next write to that folder. A fault of the
operating system (read-only folder, full disk) comes out naming the target, not the
temporary name, and for a full disk how much was needed and how much is free.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".vitkit-tmp"
_TEMP_NAME = re.compile(r".+\.(\d+)-[a-z0-9_]+" + re.escape(TEMP_SUFFIX))
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
_STARTED = time.time()  # temporary files last touched before this are not this process's


CACHE_VARIABLE = "VITKIT_CACHE"  # vitkit's cache folder; "off" turns the caches off


def cache_folder() -> Path | None:
    """vitkit's cache folder (``$VITKIT_CACHE``, default ``~/.cache/vitkit``), shared by the
    decoded image folders and the downloaded weights; None when ``VITKIT_CACHE=off``."""
    folder = os.environ.get(CACHE_VARIABLE, "~/.cache/vitkit")
    if folder.lower() in ("", "0", "off", "none"):
        return None
    return Path(folder).expanduser()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(path: Path) -> str:
    """The prefix of ``path``'s temporary names: visible, and with the writer's process id
    so that ``remove_stale_temps`` can tell a killed writer's leftovers from a live one's."""
    return f"{path.name}.{os.getpid()}-"


def is_stale_temp(entry: os.DirEntry) -> bool:
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
        stale = [e for e in os.scandir(folder) if is_stale_temp(e)]
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


def os_error_in(err: BaseException) -> OSError | None:
    """The operating system's error behind ``err``: ``err`` itself, or the one a library
    reports only in its message (safetensors: ``... No space left on device (os error 28)``),
    so that a full disk reads the same whichever library was writing."""
    if isinstance(err, OSError):
        return err
    match = _OS_ERROR_CODE.search(str(err))
    if match is None:
        return None
    code = int(match[1])
    return OSError(code, os.strerror(code))


def make_parent(path: Path) -> None:
    """Create ``path``'s folder, with one clear error when a file stands in its place, and
    remove the leftovers of killed writes there."""
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)


def atomic_write(path: Path, write: Callable[[Path], object], size: int | None = None) -> None:
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
        os_error = os_error_in(err)
        if os_error is not None:
            raise explain_os_error(os_error, path, size) from None
        raise
