"""``load_dataset``: every on-disk layout vitkit reads, into an in-memory ``ImageDataset``.

Layouts: the shipped digits, an image folder (Pillow), MNIST-style idx files, CIFAR-10/100
python pickles and ``.npz`` arrays. A source with a single split (a folder of class folders,
an ``.npz`` with ``images``/``labels``) is returned whole for any split name: hold out a
validation set with ``ImageDataset.split``. Where a source has a test split but no validation
split (MNIST, CIFAR, the digits) or the reverse, ``val`` and ``test`` stand for each other.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from vitkit.data.base import MAX_UNREADABLE_FRACTION, SkipLog
from vitkit.data.datasets import ImageDataset
from vitkit.data.folders import (
    SPLITS,
    is_unlabelled_folder,
    other_split,
    read_image_folder,
)
from vitkit.data.folders import (  # the image-folder reader's home was here
    FolderListing as FolderListing,
)
from vitkit.data.folders import list_image_folder as list_image_folder
from vitkit.data.folders import read_unlabelled as read_unlabelled

DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0


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

    prefix_name = prefix[other_split(folder, split, available)]
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
    split_files = files[other_split(folder, split, available)]
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
        classes = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in _unpickle(folder / meta_file)[names_key]
        ]
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
            found = other_split(path, split, lambda s: f"x_{s}" in arrays and f"y_{s}" in arrays)
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


# --- image folders (read in folders.py) ----------------------------------------------------


def is_image_folder(source: str | Path) -> bool:
    """Whether ``load_dataset`` reads ``source`` as an image folder (not digits, idx, CIFAR
    or .npz)."""
    path = Path(source).expanduser()
    return (
        str(source) != "digits"
        and path.is_dir()
        and not any(detect(path) for detect, _ in _FOLDER_READERS)
    )


_FOLDER_READERS: tuple[tuple[Callable[[Path], bool], Callable[[Path, str], ImageDataset]], ...] = (
    (is_idx_folder, read_idx_folder),
    (is_cifar_folder, read_cifar_folder),
)
