"""``load_dataset``: every on-disk layout vitkit reads, into an in-memory ``ImageDataset``.

Layouts: the shipped digits, an image folder (Pillow), MNIST-style idx files, CIFAR-10/100
python pickles and ``.npz`` arrays. A source with a single split (a folder of class folders,
an ``.npz`` with ``images``/``labels``) is returned whole for any split name: hold out a
validation set with ``ImageDataset.split``. Where a source has a test split but no validation
split (MNIST, CIFAR, the digits) or the reverse, ``val`` and ``test`` stand for each other.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from vitkit.data.base import MAX_UNREADABLE_FRACTION, SkipLog, check_fraction, check_unreadable
from vitkit.data.datasets import ImageDataset
from vitkit.data.images import read_image
from vitkit.utils.files import atomic_write

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0
CACHE_FORMAT_VERSION = 3  # 2: names of skipped files; 3: EXIF orientation applied
SHOWN_SKIPPED = 3


def load_dataset(
    source: str | Path,
    split: str = "train",
    *,
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
    skipped: SkipLog | None = None,
) -> ImageDataset:
    """Read ``split`` (train / val / test) of ``source`` into memory.

    ``source`` is ``"digits"`` (shipped with vitkit) or a path to:

    - an image folder: ``root/<split>/<class>/<image>`` (split folders train / val / test) or
      ``root/<class>/<image>`` (one split); JPEG, PNG and the other formats Pillow reads;
    - a folder of MNIST-style idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-*`` for test);
    - a folder of CIFAR-10/100 python pickles (``data_batch_1..5`` / ``test_batch``, or
      ``train`` / ``test``);
    - an ``.npz`` file with ``x_<split>`` / ``y_<split>`` (or ``images`` / ``labels``), uint8
      images as NHWC, NCHW or NHW (grey), and optionally ``classes`` (names).

    Unreadable images in a folder (corrupt, or over Pillow's decompression-bomb limit) are
    skipped with one warning that names the first few and counts them (or recorded in
    ``skipped``); more than ``max_unreadable_fraction`` of the split unreadable is a
    ValueError (``check_unreadable``). A folder with images
    directly in it has no labels: refused here, read by ``read_unlabelled`` for pre-training.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if str(source) == "digits":
        return load_digits(split)
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"dataset {str(source)!r} does not exist: give 'digits' (shipped with vitkit) or "
            "the path of an image folder, an idx / CIFAR folder or an .npz file"
        )
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(
                f"{path} is a file but not an .npz array file: give an .npz file or a folder"
            )
        return read_npz(path, split)
    for detect, read in _FOLDER_READERS:
        if detect(path):
            return read(path, split)
    if is_unlabelled_folder(path):
        raise ValueError(
            f"{path} holds images directly, not in class folders: it has no labels. Unlabelled "
            "images serve for pre-training (`vitkit pretrain`); to classify, put each class's "
            f"images in a folder of its own ({path}/<class>/<image>)"
        )
    return read_image_folder(path, split, max_unreadable_fraction, skipped)


def _other_split(path: Path, split: str, available: Callable[[str], bool]) -> str:
    """``split`` if ``available``, else its stand-in (val <-> test); ValueError if neither."""
    if available(split):
        return split
    stand_in = {"val": "test", "test": "val"}.get(split)
    if stand_in and available(stand_in):
        return stand_in
    raise ValueError(f"{path} has no {split!r} split: ask for one of {_present(available)}")


def _present(available: Callable[[str], bool]) -> list[str]:
    return [s for s in SPLITS if available(s)]


def _class_names(labels: np.ndarray) -> list[str]:
    return [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []


# --- the shipped digits ------------------------------------------------------------------


def load_digits(split: str = "train") -> ImageDataset:
    """The 1,797 8x8 grey handwritten digits that scikit-learn ships (classes "0".."9").

    The file has no official split: a stratified 20% (seed 0, ``ImageDataset.split``) is the
    test split (359 images), the other 1,438 are train, and ``val`` is the test split. Pixels
    0..16 are scaled to 0..255 (``round(x * 255 / 16)``).
    """
    table = np.loadtxt(DIGITS_FILE, delimiter=",", dtype=np.int64)
    pixels = np.rint(table[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    digits = ImageDataset(
        torch.from_numpy(pixels), torch.from_numpy(table[:, 64]), [str(d) for d in range(10)]
    )
    train, test = digits.split(DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return train if split == "train" else test


# --- MNIST-style idx files ---------------------------------------------------------------

_IDX_DTYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    """``train-images-idx3-ubyte[.gz]`` and its variants (``train-images.idx3-ubyte``)."""
    rank = 3 if kind == "images" else 1
    matches = sorted(folder.glob(f"{prefix}-{kind}[-.]idx{rank}-ubyte*"))
    return matches[0] if matches else None


def read_idx(path: Path) -> np.ndarray:
    """One idx file (the MNIST format: a magic number, the sizes, then the array)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(
                f"{path} is a truncated or corrupt gzip file ({err}): download it again"
            ) from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = tuple(np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or padded: {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)


def is_idx_folder(folder: Path) -> bool:
    return any(_idx_file(folder, prefix, "images") for prefix in ("train", "t10k"))


def read_idx_folder(folder: Path, split: str) -> ImageDataset:
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}

    def available(s: str) -> bool:
        return s != "val" and _idx_file(folder, prefix[s], "images") is not None

    prefix_name = prefix[_other_split(folder, split, available)]
    images_file = _idx_file(folder, prefix_name, "images")
    labels_file = _idx_file(folder, prefix_name, "labels")
    assert images_file is not None  # available() found it
    if labels_file is None:
        raise ValueError(f"{folder} has {images_file.name} but no {prefix_name}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise ValueError(
            f"{images_file} must hold uint8 (N, H, W) images matching the {len(labels)} labels "
            f"of {labels_file.name}, got {images.dtype} {images.shape}"
        )
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), _class_names(labels)
    )


# --- CIFAR-10/100 python pickles ---------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR files (dicts, lists, numpy arrays) and refuses anything else, so a
    malicious pickle cannot run code."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a readable CIFAR pickle ({err})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a CIFAR dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


_CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}


def _cifar_variant(folder: Path) -> str | None:
    for variant, files in _CIFAR_FILES.items():
        if any((folder / name).is_file() for names in files.values() for name in names):
            return variant
    return None


def is_cifar_folder(folder: Path) -> bool:
    return _cifar_variant(folder) is not None


def read_cifar_folder(folder: Path, split: str) -> ImageDataset:
    variant = _cifar_variant(folder)
    assert variant is not None  # only called on a folder is_cifar_folder recognised
    files = _CIFAR_FILES[variant]

    def available(s: str) -> bool:
        return s in files and all((folder / name).is_file() for name in files[s])

    if not any(available(s) for s in files):
        missing = [n for names in files.values() for n in names if not (folder / n).is_file()]
        raise ValueError(
            f"{folder} holds only part of {variant.upper()}: it lacks {', '.join(missing)}; "
            "unpack the whole archive there"
        )
    split_files = files[_other_split(folder, split, available)]
    batches = [_unpickle(folder / name) for name in split_files]
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    try:
        images = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
    except KeyError as err:
        raise ValueError(f"{folder}: a CIFAR pickle lacks the key {err}") from None
    meta_file, names_key = (
        ("batches.meta", "label_names") if variant == "cifar10" else ("meta", "fine_label_names")
    )
    if (folder / meta_file).is_file():
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(folder / meta_file)[names_key]]  # fmt: skip
    else:
        classes = _class_names(labels)
    return ImageDataset(
        torch.from_numpy(images.reshape(-1, 3, 32, 32)), torch.from_numpy(labels), classes
    )


# --- numpy arrays ------------------------------------------------------------------------


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(
            f"{path}: images must be uint8 (0..255), got {images.dtype}; convert them first, "
            "e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise ValueError(
        f"{path}: images of shape {images.shape} are neither NHW, NCHW nor NHWC with 1 or 3 "
        "channels"
    )


def _npz_error(path: Path, err: Exception) -> ValueError:
    """numpy's advice to pass ``allow_pickle`` is not passed on: unpickling data can run code."""
    reason = str(err)
    if "allow_pickle" in reason:
        reason = "it is no zip of plain arrays: numpy could only unpickle it, and vitkit never does"
    return ValueError(f"{path} is not a readable .npz file ({reason})")


def read_npz(path: Path, split: str) -> ImageDataset:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _npz_error(path, err) from None
    with arrays:
        if "images" in arrays and "labels" in arrays:
            images_key, labels_key = "images", "labels"
        else:
            found = _other_split(path, split, lambda s: f"x_{s}" in arrays and f"y_{s}" in arrays)
            images_key, labels_key = f"x_{found}", f"y_{found}"
        try:
            images, labels = arrays[images_key], arrays[labels_key]
            classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
        except ValueError as err:  # an array of Python objects
            raise _npz_error(path, err) from None
    images = _to_nchw(images, path)
    labels = labels.reshape(-1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels),
        classes if classes is not None else _class_names(labels),
    )


# --- image folders -----------------------------------------------------------------------


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


def is_image_folder(source: str | Path) -> bool:
    """Whether ``load_dataset`` reads ``source`` as an image folder (not digits, idx, CIFAR
    or .npz)."""
    path = Path(source).expanduser()
    return (
        str(source) != "digits"
        and path.is_dir()
        and not any(detect(path) for detect, _ in _FOLDER_READERS)
    )


def list_image_folder(path: Path, split: str) -> FolderListing:
    """The class names, image files and labels of ``split`` of an image folder (see
    ``load_dataset``); a clear error when it holds no images."""
    split_dirs = {s: path / s for s in SPLITS if (path / s).is_dir()}
    root = split_dirs[_other_split(path, split, lambda s: s in split_dirs)] if split_dirs else path
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
    cache_dir = os.environ.get("VITKIT_CACHE", "~/.cache/vitkit")
    if cache_dir.lower() in ("", "0", "off", "none"):
        return None
    key = hashlib.sha256(f"{CACHE_FORMAT_VERSION}\0{root.resolve()}\n".encode())
    for name in files:
        stat = os.stat(f"{root}/{name}")
        key.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return Path(cache_dir).expanduser() / f"imagefolder-{key.hexdigest()[:32]}.npz"


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
            return (cached["images"], cached["labels"], [str(c) for c in cached["classes"]],
                    [str(f) for f in cached["skipped"]])  # fmt: skip
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"the decoded-image cache {cache} is damaged ({err}); rebuilding it",
                      stacklevel=4)  # fmt: skip
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
    skipped = [f"{name} ({getattr(err, 'reason', err)})"
               for name, err in zip(files, decoded, strict=True)
               if not isinstance(err, np.ndarray)]  # fmt: skip
    if not readable:
        raise ValueError(f"{root}: none of its {len(files)} images could be read ({decoded[0]})")
    images = _stack([p for p in decoded if isinstance(p, np.ndarray)], root)
    label_array = np.asarray(labels, np.int64)[readable]
    if cache is not None:

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=label_array, classes=np.asarray(classes),
                         skipped=np.asarray(skipped, dtype=str))  # fmt: skip

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


def _list_unlabelled_folder(root: Path) -> FolderListing:
    """Every image under ``root``, sub-folders included (in sorted order), all with the label
    0 of no class."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        prefix = os.path.relpath(folder, root) + "/" if folder != str(root) else ""
        files += [prefix + name for name in sorted(names) if _is_image(name)]
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


_FOLDER_READERS: tuple[tuple[Callable[[Path], bool], Callable[[Path, str], ImageDataset]], ...] = (
    (is_idx_folder, read_idx_folder),
    (is_cifar_folder, read_cifar_folder),
)
