"""Hugging Face ``datasets`` as data: a ``save_to_disk`` folder, parquet files, or
``hf:NAME[:CONFIG]`` from the Hub (through its cache).

The image column is the dataset's ``Image`` feature and the label column its ``ClassLabel``
(whose names become the class names) or its one integer column, unless ``image_column`` /
``label_column`` name them. The splits ``train``, ``validation`` and ``test`` are the run's:
``validation`` is the validation split when ``val_fraction`` > 0 (instead of holding one out
of train), and the test split when there is no ``test``; a dataset with only ``train`` gets
the held-out test split of every single-split source (``open_splits``).

Images are decoded by the code that decodes image files (``open_image`` / ``upright``: EXIF
orientation, every mode to grey or RGB). A small dataset of one image size is decoded into
memory like a small image folder; a larger one is streamed: its rows are read by index in
loader workers and cropped there (``StreamingFolderSource`` with its rows for files), so
memory does not grow with the dataset.

The ``datasets`` package is an optional extra (``pip install 'vitkit[hf]'``), imported only
when such data is opened.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from vitkit.data.base import (
    STAND_IN_SPLIT,
    DataSource,
    EncodedSample,
    SkipLog,
    note_stand_in,
)
from vitkit.data.datasets import ImageDataset
from vitkit.data.folders import FolderListing, _stack
from vitkit.data.images import UnreadableImage, open_image, upright, upright_size
from vitkit.data.sources import (
    IN_MEMORY_BYTES,
    IN_MEMORY_MAX_SIDE,
    SAMPLED_HEADERS,
    DataOptions,
    InMemorySource,
    SourceKind,
    Splits,
    _in_memory_splits,
    register_source,
    streamed_splits,
)
from vitkit.data.streaming import FolderBatches, StreamingFolderSource, View

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
# vitkit's split names and the Hugging Face names that stand for them, in order of preference
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
INSTALL_HINT = (
    "reading Hugging Face datasets needs the 'datasets' package: pip install 'vitkit[hf]'"
)


def datasets_module() -> Any:
    """The ``datasets`` package, or a one-line error naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return datasets


# --- what --data names -------------------------------------------------------------------


def is_saved_dataset(path: Path) -> bool:
    """A ``save_to_disk`` folder: a ``DatasetDict`` (dataset_dict.json) or a ``Dataset``
    (dataset_info.json and state.json)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def parquet_files(path: Path) -> list[Path]:
    """The parquet files of ``path``: itself, the ones in it, or in its ``data/`` folder (the
    Hub's layout)."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if not path.is_dir():
        return []
    return sorted(path.glob("*.parquet")) or sorted(path.glob("data/*.parquet"))


def is_hf_data(data: str) -> bool:
    """Whether ``--data`` names a Hugging Face dataset (read without importing ``datasets``)."""
    if data.startswith(HUB_PREFIX):
        return True
    path = Path(data).expanduser()
    return data != "digits" and (is_saved_dataset(path) or bool(parquet_files(path)))


def hub_name(data: str) -> tuple[str, str | None]:
    """(NAME, CONFIG or None) of ``hf:NAME[:CONFIG]``."""
    name, _, config = data.removeprefix(HUB_PREFIX).partition(":")
    if not name:
        raise ValueError(f"{data!r} names no dataset: write hf:NAME or hf:NAME:CONFIG")
    return name, config or None


def load_splits(data: str) -> dict[str, Any]:
    """The splits of ``data`` by their Hugging Face names, as ``datasets.Dataset``s."""
    datasets = datasets_module()
    if data.startswith(HUB_PREFIX):
        name, config = hub_name(data)
        try:
            loaded = datasets.load_dataset(name, config)
        except Exception as err:  # the Hub's, the cache's and the builder's errors alike
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not load the Hugging Face dataset {name!r}"
                f"{f' (config {config!r})' if config else ''}: {reason}. Offline "
                "(HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) it must be in the cache "
                f"({datasets.config.HF_DATASETS_CACHE}, set by HF_DATASETS_CACHE or HF_HOME)"
            ) from None
    else:
        path = Path(data).expanduser()
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            loaded = datasets.load_dataset("parquet", data_files={"train": str(path)})
        else:  # split names from the file names, as the Hub reads them
            loaded = datasets.load_dataset("parquet", data_dir=str(path))
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def pick_split(data: str, splits: dict[str, Any], split: str) -> str:
    """The name of the Hugging Face split that stands for vitkit's ``split`` (train / val /
    test): val and test stand in for each other, as in shards, and without either the train
    split is every split (a single-split source, ``open_splits``)."""
    for wanted in (split, STAND_IN_SPLIT.get(split), "train"):
        for name in SPLIT_NAMES.get(wanted or "", ()):
            if name in splits:
                if wanted not in (split, "train"):
                    note_stand_in(data, split, name)
                return name
    raise ValueError(f"{data} has no {split!r} split: it has {sorted(splits)}")


# --- columns -----------------------------------------------------------------------------


def image_column(data: str, dataset: Any, named: str | None) -> str:
    """The column of the images: ``named``, else the one ``Image`` feature."""
    datasets = datasets_module()
    if named is not None:
        if named not in dataset.features:
            raise ValueError(
                f"{data} has no column {named!r} for the images: its columns are "
                f"{list(dataset.features)}"
            )
        return named
    found = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
    if len(found) != 1:
        what = "no Image column" if not found else f"several Image columns {found}"
        raise ValueError(
            f"{data} has {what} (columns: {list(dataset.features)}): name the images with "
            "--image-column ([data] image_column)"
        )
    return found[0]


def label_column(data: str, dataset: Any, named: str | None) -> str:
    """The column of the labels: ``named``, else the one ``ClassLabel``, else the one
    integer column."""
    datasets = datasets_module()
    features = dataset.features
    if named is not None:
        if named not in features:
            raise ValueError(
                f"{data} has no column {named!r} for the labels: its columns are {list(features)}"
            )
        return named
    found = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not found:
        found = [
            c
            for c, f in features.items()
            if isinstance(f, datasets.Value) and f.dtype.startswith(("int", "uint"))
        ]
    if len(found) != 1:
        what = "no ClassLabel or integer column" if not found else f"several label columns {found}"
        raise ValueError(
            f"{data} has {what} (columns: {list(features)}): name the labels with "
            "--label-column ([data] label_column)"
        )
    return found[0]


def class_names(data: str, splits: dict[str, Any], column: str) -> list[str]:
    """A ``ClassLabel``'s names; for plain integers, "0" up to the largest label of any
    split."""
    feature = next(iter(splits.values())).features[column]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    largest = max(int(column_values(s, column).max(initial=-1)) for s in splits.values())
    if largest < 0:
        raise ValueError(f"{data}: column {column!r} holds no labels")
    return [str(label) for label in range(largest + 1)]


def column_values(dataset: Any, column: str) -> np.ndarray:
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[column])


def row_labels(data: str, dataset: Any, column: str, classes: list[str]) -> torch.Tensor:
    labels = torch.from_numpy(column_values(dataset, column).astype(np.int64))
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise ValueError(
            f"{data}: labels of column {column!r} must lie in [0, {len(classes)}), got "
            f"[{int(labels.min())}, {int(labels.max())}] (-1 marks a row without a label): "
            "name another column with --label-column"
        )
    return labels


# --- the images of a split ---------------------------------------------------------------


class Rows:
    """One split's images as undecoded bytes or paths, read by row (what loader workers
    open: the dataset's memory-mapped Arrow files travel to them by reference)."""

    def __init__(self, data: str, name: str, dataset: Any, column: str) -> None:
        datasets = datasets_module()
        self.data, self.name = data, name
        self.dataset = dataset.select_columns([column]).cast_column(
            column, datasets.Image(decode=False)
        )
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def row_name(self, row: int) -> str:
        return f"{self.name}[{row}]"

    def open(self, row: int) -> str | BinaryIO:
        """A file object of the image's bytes (or the path of a dataset that stores paths)."""
        value = self.dataset[row][self.column]
        if value is None:
            raise UnreadableImage(Path(self.row_name(row)), ValueError("the row has no image"))
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        return str(value["path"])

    def decode(self, row: int) -> np.ndarray:
        """(H, W) grey or (H, W, 3) RGB uint8 pixels, upright (as ``read_image``)."""
        with open_image(self.open(row), self.row_name(row)) as image:
            return np.asarray(upright(image))

    def uniform_size(self) -> tuple[int, int] | None:
        """The one (width, height) of up to ``SAMPLED_HEADERS`` images spread over the split
        (headers only); None if they differ."""
        step = max(1, len(self) // SAMPLED_HEADERS)
        sizes = set()
        for row in range(0, len(self), step)[:SAMPLED_HEADERS]:
            try:
                with open_image(self.open(row), self.row_name(row)) as image:
                    sizes.add(upright_size(image))
            except ValueError:
                continue  # an unreadable image says nothing about the others
        return sizes.pop() if len(sizes) == 1 else None


def decode_rows(
    rows: Rows, labels: torch.Tensor, classes: list[str], skipped: SkipLog
) -> ImageDataset:
    """Every image of a split decoded into memory; unreadable ones skipped and counted."""
    pixels, kept = [], []
    for row in range(len(rows)):
        try:
            pixels.append(rows.decode(row))
            kept.append(row)
        except UnreadableImage as err:
            skipped.add([f"{rows.row_name(row)} ({err.reason})"])
    if not pixels:
        raise ValueError(f"{rows.data}: split {rows.name!r} holds no readable image")
    images = torch.from_numpy(_stack(pixels, Path(rows.data)))
    return ImageDataset(images, labels[kept], classes)


class RowBatches(FolderBatches):
    """``FolderBatches`` whose files are rows of a Hugging Face dataset."""

    def __init__(self, rows: Rows, positions: np.ndarray, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows, self.positions = rows, positions

    def open(self, chosen: int) -> str | BinaryIO:
        return self.rows.open(int(self.positions[chosen]))


class StreamingRowSource(StreamingFolderSource):
    """A Hugging Face dataset split streamed as an image folder is: rows decoded by index in
    the loader's workers (``RowBatches``); its listing names each row ``split[row]``."""

    def __init__(self, rows: Rows, listing: FolderListing, **kwargs: Any) -> None:
        super().__init__(listing, **kwargs)
        self.rows = rows

    def _reader(self, view: View, seed: int, epoch: int, train: bool) -> FolderBatches:
        return RowBatches(
            self.rows,
            self.indices.numpy(),
            str(self.listing.root),
            self.files,
            self.labels,
            view,
            seed,
            epoch,
            substitute=train,
        )

    def encoded_samples(self) -> Iterator[EncodedSample]:
        """Each image's stored bytes with its format's extension (no re-encoding)."""
        for row, label in zip(self.indices.tolist(), self.labels.tolist(), strict=True):
            file = self.rows.open(row)
            data = Path(file).read_bytes() if isinstance(file, str) else file.read()
            try:
                with open_image(io.BytesIO(data), self.rows.row_name(row)) as image:
                    ext = (image.format or "png").lower().replace("jpeg", "jpg")
            except UnreadableImage as err:
                self.skipped.add([f"{self.rows.row_name(row)} ({err.reason})"])
                continue
            yield EncodedSample(ext, data, label)


# --- the source kind ---------------------------------------------------------------------


class HFData:
    """The splits of one ``--data`` with its columns and class names found."""

    def __init__(self, data: str, options: DataOptions) -> None:
        self.data, self.options = data, options
        self.splits = load_splits(data)
        first = self.splits[pick_split(data, self.splits, "train")]
        self.image_column = image_column(data, first, options.image_column)
        self.label_column = label_column(data, first, options.label_column)
        self.classes = class_names(data, self.splits, self.label_column)

    def has(self, split: str) -> bool:
        return any(name in self.splits for name in SPLIT_NAMES[split])

    @property
    def single_split(self) -> bool:
        """Only a train split: the test split is held out of it."""
        return not self.has("test") and not self.has("val")

    def rows(self, split: str) -> tuple[Rows, torch.Tensor]:
        name = pick_split(self.data, self.splits, split)
        dataset = self.splits[name]
        for column in (self.image_column, self.label_column):
            if column not in dataset.features:
                raise ValueError(f"{self.data}: split {name!r} has no column {column!r}")
        labels = row_labels(self.data, dataset, self.label_column, self.classes)
        return Rows(self.data, name, dataset, self.image_column), labels

    def streams(self) -> bool:
        """Streamed unless ``in_memory`` says otherwise or (``auto``) the training split is
        small and of one size (the image folders' rule, judged from sampled headers)."""
        if self.options.in_memory != "auto":
            return self.options.in_memory == "no"
        rows, _ = self.rows("train")
        size = rows.uniform_size()
        if size is None or max(size) > IN_MEMORY_MAX_SIDE:
            return True
        return len(rows) * size[0] * size[1] * 3 > IN_MEMORY_BYTES

    def open(self, split: str, streamed: bool) -> DataSource:
        rows, labels = self.rows(split)
        what = f"{self.data} ({rows.name})"
        skipped = SkipLog(what, len(rows), self.options.max_unreadable_fraction)
        if not streamed:
            return InMemorySource(decode_rows(rows, labels, self.classes, skipped), True, skipped)
        listing = FolderListing(
            Path(self.data),
            self.classes,
            [rows.row_name(row) for row in range(len(rows))],
            labels.tolist(),
            single_split=self.single_split,
        )
        return StreamingRowSource(
            rows,
            listing,
            augment=self.options.augment,
            num_workers=self.options.num_workers,
            skipped=skipped,
        )


def open_hf_source(data: str, split: str, options: DataOptions) -> DataSource:
    hf = HFData(data, options)
    return hf.open(split, hf.streams())


def open_hf_splits(
    data: str, val_fraction: float, seed: int, options: DataOptions, train_fraction: float
) -> Splits:
    hf = HFData(data, options)
    streamed = hf.streams()
    logger.info(
        "%s: Hugging Face dataset, splits %s, %s",
        data,
        sorted(hf.splits),
        "streamed by row" if streamed else "decoded into memory",
    )
    given_val = val_fraction > 0 and hf.has("val") and hf.has("test")
    train = hf.open("train", streamed)
    test = None if hf.single_split else hf.open("test", streamed)
    own_val_fraction = 0.0 if given_val else val_fraction
    if streamed:
        assert isinstance(train, StreamingFolderSource)
        splits = streamed_splits(data, train, test, own_val_fraction, seed, train_fraction)
    else:
        assert isinstance(train, InMemorySource) and isinstance(test, InMemorySource | None)
        assert train.skipped is not None
        # one split: the same images, of which ``_in_memory_splits`` holds a test split out
        held_out = train if test is None else test
        assert held_out.skipped is not None
        splits = _in_memory_splits(
            data,
            own_val_fraction,
            seed,
            train_fraction,
            train.dataset,
            held_out.dataset,
            (train.skipped, held_out.skipped),
        )
    if given_val:
        splits.val = hf.open("val", streamed)
    return splits


register_source(SourceKind("Hugging Face dataset", is_hf_data, open_hf_source, open_hf_splits))
