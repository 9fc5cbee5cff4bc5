"""Image folders: a folder of class folders (optionally under train / val / test folders), or
of images without classes (pre-training). Listed here once (``list_image_folder``), then
either decoded whole into memory (``read_image_folder``, cached on disk; ``load_dataset``)
or streamed file by file (``vitkit.data.streaming``), so both read the same files with the
same labels.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitkit.data.base import (
    MAX_UNREADABLE_FRACTION,
    SHOWN_SKIPPED,
    STAND_IN_SPLIT,
    SkipLog,
    check_fraction,
    check_unreadable,
    note_stand_in,
)
from vitkit.data.datasets import ImageDataset
from vitkit.data.images import read_image
from vitkit.utils.files import atomic_write, cache_folder

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CACHE_FORMAT_VERSION = 3  # 2: names of skipped files; 3: EXIF orientation applied


def other_split(path: Path, split: str, available: Callable[[str], bool]) -> str:
    """``split`` if ``available``, else its stand-in (val <-> test); ValueError if neither."""
    if available(split):
        return split
    stand_in = STAND_IN_SPLIT.get(split)
    if stand_in and available(stand_in):
        note_stand_in(str(path), split, stand_in)
        return stand_in
    raise ValueError(f"{path} has no {split!r} split: ask for one of {present_splits(available)}")


def present_splits(available: Callable[[str], bool]) -> list[str]:
    return [s for s in SPLITS if available(s)]


def _decode(path: str) -> np.ndarray | Exception:
    """``read_image``'s pixels, or the error that made the file unreadable (to be counted)."""
    try:
        return read_image(path)
    except (OSError, ValueError) as err:
        return err


@dataclass(frozen=True)
class FolderListing:
    """The images of one split of an image folder, listed but not decoded."""

    root: Path  # the split's folder: files are relative to it
    classes: list[str]
    files: list[str]  # strings: pathlib is slow on 50,000 files
    labels: list[int]
    single_split: bool  # no train / val / test folders: every split name lists these files


def list_image_folder(path: Path, split: str) -> FolderListing:
    """The class names, image files and labels of ``split`` of an image folder (see
    ``load_dataset``); a clear error when it holds no images."""
    split_dirs = {s: path / s for s in SPLITS if (path / s).is_dir()}
    root = split_dirs[other_split(path, split, lambda s: s in split_dirs)] if split_dirs else path
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = sorted(
            f"{name}/{entry.name}"
            for entry in os.scandir(root / name)
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
        )
        files += class_files
        labels += [label] * len(class_files)
    if not files:
        raise ValueError(
            f"{root} has no images: expected {root}/<class>/<image> "
            f"(or train / val / test folders above that), with suffixes "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return FolderListing(root, classes, files, labels, single_split=not split_dirs)


def _cache_file(root: Path, files: list[str]) -> Path | None:
    """Where the decoded ``root`` is cached (``$VITKIT_CACHE``, default ``~/.cache/vitkit``),
    keyed by every file's path, size and mtime; None when ``VITKIT_CACHE=off``."""
    cache_dir = cache_folder()
    if cache_dir is None:
        return None
    key = hashlib.sha256(f"{CACHE_FORMAT_VERSION}\0{root.resolve()}\n".encode())
    for name in files:
        stat = os.stat(f"{root}/{name}")
        key.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir / f"imagefolder-{key.hexdigest()[:32]}.npz"


def _stack(pixels: list[np.ndarray], root: Path) -> np.ndarray:
    """(N, C, H, W): grey only if every image is grey; images of another size than the most
    common one are resized to it (with a warning), since a batch needs one size."""
    sizes = Counter(p.shape[:2] for p in pixels)
    (height, width), _ = sizes.most_common(1)[0]
    if len(sizes) > 1:
        warnings.warn(
            f"{root}: {sum(sizes.values()) - sizes[height, width]} images are not "
            f"{height}x{width} (the most common size) and were resized to it",
            stacklevel=4,
        )
        pixels = [
            p
            if p.shape[:2] == (height, width)
            else np.asarray(Image.fromarray(p).resize((width, height), Image.Resampling.BICUBIC))
            for p in pixels
        ]
    if all(p.ndim == 2 for p in pixels):
        return np.stack(pixels)[:, None]
    rgb = [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p for p in pixels]
    return np.stack(rgb).transpose(0, 3, 1, 2)


def _read_cache(cache: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]] | None:
    """What ``_decode_folder`` cached, or None (with a warning) when the file is damaged, so
    that it is rebuilt."""
    try:
        with np.load(cache, allow_pickle=False) as cached:
            return (
                cached["images"],
                cached["labels"],
                [str(c) for c in cached["classes"]],
                [str(f) for f in cached["skipped"]],
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(
            f"the decoded-image cache {cache} is damaged ({err}); rebuilding it", stacklevel=4
        )
        return None


def _decode_folder(listing: FolderListing) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Decode every listed image in parallel: (images, labels, classes, the unreadable images
    skipped, as "path (reason)"), cached on disk so the next call is instant."""
    root, classes, files, labels = listing.root, listing.classes, listing.files, listing.labels
    cache = _cache_file(root, files)
    if cache is not None and cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        decoded = list(pool.map(_decode, [f"{root}/{name}" for name in files], chunksize=256))
    readable = [i for i, p in enumerate(decoded) if isinstance(p, np.ndarray)]
    skipped = [
        f"{name} ({getattr(err, 'reason', err)})"
        for name, err in zip(files, decoded, strict=True)
        if not isinstance(err, np.ndarray)
    ]
    if not readable:
        raise ValueError(f"{root}: none of its {len(files)} images could be read ({decoded[0]})")
    images = _stack([p for p in decoded if isinstance(p, np.ndarray)], root)
    label_array = np.asarray(labels, np.int64)[readable]
    if cache is not None:

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    images=images,
                    labels=label_array,
                    classes=np.asarray(classes),
                    skipped=np.asarray(skipped, dtype=str),
                )

        try:
            atomic_write(cache, write)
        except OSError as err:
            warnings.warn(f"could not cache the decoded images in {cache} ({err})", stacklevel=3)
    return images, label_array, classes, skipped


def read_image_folder(
    path: Path,
    split: str,
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
    log: SkipLog | None = None,
) -> ImageDataset:
    listing = list_image_folder(path, split)
    images, labels, classes, skipped = _decode_folder(listing)
    _report_skipped(listing, skipped, max_unreadable_fraction, log)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


def _report_skipped(
    listing: FolderListing, skipped: list[str], max_fraction: float, log: SkipLog | None
) -> None:
    """The policy of ``SkipLog`` for a folder decoded at once: the names into ``log`` (which
    checks the fraction), or without one a single warning and the fraction checked here."""
    if log is not None:
        log.total, log.max_fraction = len(listing.files), check_fraction(max_fraction)
        log.add(skipped)
        return
    check_unreadable(str(listing.root), skipped, len(listing.files), max_fraction)
    _warn_skipped(listing.root, skipped, len(listing.files) - len(skipped))


def _warn_skipped(root: Path, skipped: list[str], read: int) -> None:
    if skipped:
        more = len(skipped) - SHOWN_SKIPPED
        # stacklevel 1: one location, so that Python's default filter shows this once per
        # process however many times (and from wherever) the folder is loaded
        warnings.warn(
            f"{root}: skipped {len(skipped)} unreadable or corrupt image(s) of "
            f"{len(skipped) + read}: {'; '.join(skipped[:SHOWN_SKIPPED])}"
            + (f"; and {more} more" if more > 0 else ""),
            stacklevel=1,
        )


# --- unlabelled image folders (pre-training) -----------------------------------------------


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def is_unlabelled_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with images directly in it: images not sorted into class
    folders, so without labels (a labelled folder holds only class or split folders)."""
    return path.is_dir() and any(e.is_file() and _is_image(e.name) for e in os.scandir(path))


def image_files(root: Path) -> list[str]:
    """Every image file under ``root`` by its suffix, sub-folders included, in sorted order,
    as paths relative to ``root``."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        prefix = os.path.relpath(folder, root) + "/" if folder != str(root) else ""
        files += [prefix + name for name in sorted(names) if _is_image(name)]
    return files


def expand_folder(path: Path) -> list[Path]:
    """``path`` itself, or, for a folder, every image file under it (``image_files``): what
    the commands that take image files (``predict``, ``analyze --images``) read for a folder."""
    if not path.is_dir():
        return [path]
    files = [path / name for name in image_files(path)]
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"folder {path} holds no image files (by suffix: {suffixes})")
    return files


def _list_unlabelled_folder(root: Path) -> FolderListing:
    """Every image under ``root`` (``image_files``), all with the label 0 of no class."""
    files = image_files(root)
    return FolderListing(root, [], files, [0] * len(files), single_split=True)


def read_unlabelled(
    source: str | Path,
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
    skipped: SkipLog | None = None,
) -> torch.Tensor | None:
    """The uint8 images (N, C, H, W) of an unlabelled folder (``is_unlabelled_folder``),
    decoded and cached as labelled folders are, unreadable ones handled as ``load_dataset``
    does; None for any other source."""
    path = Path(source).expanduser()
    if str(source) == "digits" or not is_unlabelled_folder(path):
        return None
    listing = _list_unlabelled_folder(path)
    images, _, _, unreadable = _decode_folder(listing)
    _report_skipped(listing, unreadable, max_unreadable_fraction, skipped)
    return torch.from_numpy(images)
