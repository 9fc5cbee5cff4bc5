"""Data sources: what the training loop and the evaluators read, whatever holds the images.

A ``DataSource`` (``base.py``) hands out batches of uint8 images (and labels, when it has
them) for one process of a run. Training asks for the batches of an epoch *from a given batch
on*, so a run resumed in the middle of an epoch continues with exactly the images it would
have seen; evaluation asks for every example exactly once over all processes. The loop never
learns whether the images sit in memory or are streamed: ``InMemorySource`` holds a decoded
dataset, ``StreamingFolderSource`` decodes an image folder as it goes, ``ShardSource`` reads
WebDataset shards. ``open_source`` / ``open_splits`` are the one place that picks which: the
first of the ``SOURCES`` (a ``SourceKind`` each: a detector and the ways to open it) that
detects the data, so a new kind of source is one ``register_source`` call.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from PIL import Image

from vitkit.data.augment import AugmentConfig
from vitkit.data.base import (
    MAX_UNREADABLE_FRACTION,
    SHOWN_SKIPPED,
    STAND_IN_SPLIT,
    Batch,
    DataSource,
    EncodedSample,
    SkipLog,
    SourceInfo,
    note_stand_in,
)
from vitkit.data.datasets import ImageDataset, batch_indices, differing_classes, iterate_batches
from vitkit.data.folders import (
    FolderListing,
    is_unlabelled_folder,
    list_image_folder,
    read_unlabelled,
)
from vitkit.data.images import open_image, upright_size
from vitkit.data.readers import is_cifar_folder, is_idx_folder, is_image_folder, load_dataset
from vitkit.data.shards import ShardSource, is_shards, read_index
from vitkit.data.streaming import StreamingFolderSource
from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.utils.files import atomic_write
from vitkit.utils.plugins import ensure_loaded

logger = logging.getLogger(__name__)

HELD_OUT_TEST = 0.2
# An image folder stays in memory when the headers sampled show one size of at most
# IN_MEMORY_MAX_SIDE pixels a side and the decoded folder would take at most IN_MEMORY_BYTES.
IN_MEMORY_MAX_SIDE = 256
IN_MEMORY_BYTES = 2 * 1024**3
SAMPLED_HEADERS = 64

__all__ = ["Batch", "DataSource", "SourceInfo"]  # re-exported: the protocol's home was here


@dataclass(frozen=True)
class DataOptions:
    """How to read data: ``in_memory`` ``auto`` (small uniform sources in memory, other image
    folders streamed), ``yes`` or ``no`` (image folders only: array formats and the digits
    are always in memory, shards always streamed); loader ``num_workers`` per process for
    streamed data (None: ``min(4, CPUs)``); ``augment`` for the crops of streamed images;
    ``max_unreadable_fraction`` of a split that may be skipped as unreadable (``SkipLog``);
    ``image_column`` / ``label_column`` of a Hugging Face dataset (None: found from its
    features, ``hf_datasets``)."""

    in_memory: Literal["auto", "yes", "no"] = "auto"
    num_workers: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION
    image_column: str | None = None
    label_column: str | None = None


class InMemorySource:
    """A ``DataSource`` over an ``ImageDataset`` held in memory; with ``labelled=False`` its
    labels are hidden (``classes`` and ``Batch.labels`` None), for unlabelled images;
    ``skipped`` holds the files the reader could not decode (for ``Splits.report``)."""

    def __init__(
        self, dataset: ImageDataset, labelled: bool = True, skipped: SkipLog | None = None
    ) -> None:
        self.dataset = dataset
        self.labelled = labelled
        self.skipped = skipped

    @property
    def info(self) -> SourceInfo:
        classes = list(self.dataset.classes) if self.labelled else None
        return SourceInfo(classes, self.dataset.images.shape[1], len(self))

    def __len__(self) -> int:
        return len(self.dataset)

    def set_image_size(
        self, size: tuple[int, int], preprocessing: EvalPreprocessing | None = None
    ) -> None:
        """Nothing to do: the batch transform resizes (or crops) the stored images."""

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        plan = batch_indices(
            len(self.dataset),
            batch_size,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            drop_last=True,
            start=start,
        )
        for indices in plan:
            labels = self.dataset.labels[indices] if self.labelled else None
            yield Batch(self.dataset.images[indices], labels, image_ids=indices, epoch=epoch)

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        shard = self.dataset.subset(torch.arange(rank, len(self.dataset), world_size))
        for images, labels in iterate_batches(shard, batch_size, shuffle=False, seed=0, epoch=0):
            yield Batch(images, labels if self.labelled else None)

    def encoded_samples(self) -> Iterator[EncodedSample]:
        """Each image as a PNG file (lossless), with its label: what ``vitkit data pack``
        writes."""
        for image, label in zip(self.dataset.images, self.dataset.labels.tolist(), strict=True):
            pixels = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            yield EncodedSample("png", buffer.getvalue(), label)


def as_source(data: DataSource | ImageDataset) -> DataSource:
    return InMemorySource(data) if isinstance(data, ImageDataset) else data


@dataclass
class Splits:
    train: DataSource
    val: DataSource | None
    test: DataSource
    held_out_test: bool = False  # the source had one split; test was held out of it

    def sources(self) -> list[DataSource]:
        return [s for s in (self.train, self.val, self.test) if s is not None]

    def set_image_size(
        self, size: tuple[int, int], preprocessing: EvalPreprocessing | None = None
    ) -> None:
        for source in self.sources():
            source.set_image_size(size, preprocessing)

    def report(self, listing: Path | None = None, *, final: bool = True) -> dict[str, Any]:
        """For ``summary.json``: how many unreadable files (or shards, samples) the sources
        skipped, over every process (a collective under ``torch.distributed``: every rank
        calls it), and the first few names. ``listing`` (a run's ``skipped_files.txt``) gets
        every name with its reason, one a line, added to what it listed (a resumed run's
        earlier part), written atomically; ``final`` logs the count."""
        logs = {id(log): log for s in self.sources() if (log := getattr(s, "skipped", None))}
        names = list(dict.fromkeys(n for log in logs.values() for n in log.skipped))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, names)
            names = list(dict.fromkeys(n for part in gathered for n in part or []))
        if listing is not None:
            listed = listing.read_text().splitlines() if listing.is_file() else []
            names = list(dict.fromkeys(listed + names))
            if names:
                text = "".join(name + "\n" for name in names)
                atomic_write(listing, lambda tmp: tmp.write_text(text))
        if names and final:
            where = f"; all listed in {listing}" if listing is not None else ""
            examples = "; ".join(names[:SHOWN_SKIPPED])
            logger.warning(
                "skipped %d unreadable file(s) in all: %s%s", len(names), examples, where
            )
        return {"skipped_files": len(names), "skipped_examples": names[:SHOWN_SKIPPED]}


def streams(data: str, options: DataOptions) -> bool:
    """Whether ``data`` is read streamed: shards always; an image folder unless it is small
    and uniform (``auto``: judged from a sample of image headers, without decoding) or
    ``in_memory`` says otherwise; the array formats and the digits never."""
    if is_shards(data):
        _refuse_in_memory_shards(data, options)
        return True
    if not is_image_folder(data) or options.in_memory == "yes":
        return False
    if options.in_memory == "no":
        return True
    listing = list_image_folder(Path(data).expanduser(), "train")
    size = uniform_size(listing)
    if size is None:
        return True
    small = max(size) <= IN_MEMORY_MAX_SIDE
    return not (small and len(listing.files) * size[0] * size[1] * 3 <= IN_MEMORY_BYTES)


def uniform_size(listing: FolderListing) -> tuple[int, int] | None:
    """The one (width, height) of the images, judged from up to ``SAMPLED_HEADERS`` headers
    spread over the folder (Pillow reads a header without decoding); None if they differ."""
    step = max(1, len(listing.files) // SAMPLED_HEADERS)
    sizes = set()
    for name in listing.files[::step][:SAMPLED_HEADERS]:
        try:
            with open_image(listing.root / name) as image:
                sizes.add(upright_size(image))
        except (ValueError, FileNotFoundError):
            continue  # an unreadable file says nothing about the others
    return sizes.pop() if len(sizes) == 1 else None


# --- the kinds of source: each a detector and the two ways to open it -------------------

Reader = Callable[..., ImageDataset]
"""``read(data, split, *, max_unreadable_fraction, skipped) -> ImageDataset``: one split of an
in-memory source (``load_dataset``'s signature)."""


@dataclass(frozen=True)
class SourceKind:
    """A kind of data ``--data`` can name: ``detect(data)`` says whether ``data`` is one;
    ``open(data, split, options)`` opens one split (``open_source``) and ``open_splits(data,
    val_fraction, seed, options, train_fraction)`` the train, validation and test sources of
    a run (``open_splits``). Sources held in memory need only a ``Reader``: ``in_memory``."""

    name: str
    detect: Callable[[str], bool]
    open: Callable[[str, str, DataOptions], DataSource]
    open_splits: Callable[[str, float, int, DataOptions, float], Splits]


def in_memory(name: str, detect: Callable[[str], bool], read: Reader) -> SourceKind:
    """The kind of a source decoded whole into memory by ``read`` (``Reader``): the split
    rules of ``open_splits`` (held-out test of a single split, stratified validation and
    training fractions) come with it."""
    return SourceKind(
        name,
        detect,
        lambda data, split, options: _open_in_memory(read, data, split, options),
        lambda data, val_fraction, seed, options, train_fraction: _read_in_memory_splits(
            read, data, val_fraction, seed, options, train_fraction
        ),
    )


def _path_test(test: Callable[[Path], bool]) -> Callable[[str], bool]:
    return lambda data: data != "digits" and test(Path(data).expanduser())


IMAGE_FOLDER = "image folder"
SOURCES: list[SourceKind] = []
"""The kinds of source, tried in this order by ``detect_source``; a plugin adds its own with
``register_source``. Data no kind detects is read by ``load_dataset``, which explains what it
accepts."""


def register_source(kind: SourceKind, *, before: str | None = IMAGE_FOLDER) -> None:
    """Add a kind of source, tried before the kind named ``before`` (by default before image
    folders, which take any other folder; None: last)."""
    if any(known.name == kind.name for known in SOURCES):
        raise ValueError(f"data source {kind.name!r} is registered twice")
    names = [known.name for known in SOURCES]
    SOURCES.insert(names.index(before) if before in names else len(SOURCES), kind)


def detect_source(data: str) -> SourceKind:
    """The first kind in ``SOURCES`` (plugins' included) that detects ``data``; data none
    detects goes to ``load_dataset``, which names what it accepts."""
    ensure_loaded()
    return next((kind for kind in SOURCES if kind.detect(data)), _UNDETECTED)


def open_source(data: str, split: str, options: DataOptions | None = None) -> DataSource:
    """Split ``split`` of ``data``, whole, in memory or streamed (``streams``)."""
    return detect_source(data).open(data, split, options or DataOptions())


def open_splits(
    data: str,
    val_fraction: float,
    seed: int,
    options: DataOptions | None = None,
    *,
    train_fraction: float = 1.0,
) -> Splits:
    """The train, validation (held out of train, stratified; None for ``val_fraction == 0``)
    and test sources of ``data``, in memory or streamed as ``options`` and ``streams`` decide
    (the log says which).

    ``train_fraction`` < 1 keeps a stratified subset of the training split (before the
    validation images are held out of it), for data-size experiments: the subsets of one
    ``seed`` are nested (each class draws one permutation and keeps a prefix of it), and the
    test split is the same whatever the fraction.

    A source with a single split (a folder of class folders, one .npz of images/labels) comes
    back whole for every split name: a stratified ``HELD_OUT_TEST`` of it, chosen by ``seed``,
    becomes the test split instead of testing on training images. ``vitkit eval`` uses the
    same function, so with the run's seed it evaluates on the run's own test images. Shards
    keep the splits they were packed with (``vitkit data pack`` holds out the same way), and
    a validation split must have been packed. An unlabelled folder (``read_unlabelled``) is
    decoded into memory and split the same way into sources without labels.
    """
    kind = detect_source(data)
    return kind.open_splits(data, val_fraction, seed, options or DataOptions(), train_fraction)


def _open_in_memory(read: Reader, data: str, split: str, options: DataOptions) -> DataSource:
    log = SkipLog(data, max_fraction=options.max_unreadable_fraction)
    dataset = read(data, split, max_unreadable_fraction=log.max_fraction, skipped=log)
    return InMemorySource(dataset, skipped=log)


def _read_in_memory_splits(
    read: Reader,
    data: str,
    val_fraction: float,
    seed: int,
    options: DataOptions,
    train_fraction: float,
) -> Splits:
    """The splits of an in-memory source: its train and test splits read, each with its own
    record of skipped files."""
    skipped = SkipLog(data, max_fraction=options.max_unreadable_fraction)
    fraction = skipped.max_fraction
    test_skipped = SkipLog(data, max_fraction=fraction)
    train = read(data, "train", max_unreadable_fraction=fraction, skipped=skipped)
    test = read(data, "test", max_unreadable_fraction=fraction, skipped=test_skipped)
    logger.info("%s: decoded into memory", data)
    return _in_memory_splits(
        data, val_fraction, seed, train_fraction, train, test, (skipped, test_skipped)
    )


# --- shards ------------------------------------------------------------------------------


def _refuse_in_memory_shards(data: str, options: DataOptions) -> None:
    if options.in_memory == "yes":
        raise ValueError(
            f"{data} is a shard dataset: shards are always streamed; drop --data-in-memory yes"
        )


def _open_shards(data: str, split: str, options: DataOptions) -> ShardSource:
    _refuse_in_memory_shards(data, options)
    index = read_index(data)
    found = split if split in index.splits else STAND_IN_SPLIT.get(split)
    if found not in index.splits:
        raise ValueError(f"{data} has no {split!r} split: it has {sorted(index.splits)}")
    if found != split:
        note_stand_in(data, split, found)
    return ShardSource(
        index.splits[found],
        index.classes,
        index.channels,
        augment=options.augment,
        num_workers=options.num_workers,
        max_unreadable_fraction=options.max_unreadable_fraction,
    )


def _shard_splits(
    data: str, val_fraction: float, seed: int, options: DataOptions, train_fraction: float
) -> Splits:
    _refuse_in_memory_shards(data, options)
    if train_fraction < 1.0:
        raise ValueError(
            f"{data} is a shard dataset: train_fraction needs an image folder or "
            "an in-memory source"
        )
    index = read_index(data)
    shards = _open_shards(data, "train", options)
    if val_fraction > 0 and "val" not in index.splits:
        raise ValueError(
            f"{data} has no validation shards: pack them with `vitkit data "
            "pack --val-fraction`, or train with --val-fraction 0"
        )
    val = _open_shards(data, "val", options) if val_fraction > 0 else None
    logger.info("%s: streaming %d training shard(s)", data, len(shards.shards))
    return Splits(shards, val, _open_shards(data, "test", options), index.held_out_test)


# --- unlabelled and labelled image folders -----------------------------------------------


def _unlabelled_splits(
    data: str, val_fraction: float, seed: int, options: DataOptions, train_fraction: float
) -> Splits:
    skipped = SkipLog(data, max_fraction=options.max_unreadable_fraction)
    unlabelled = read_unlabelled(data, skipped.max_fraction, skipped)
    assert unlabelled is not None  # detected as an unlabelled folder
    logger.info("%s: decoded into memory", data)
    dataset = as_unlabelled_dataset(unlabelled)
    return _in_memory_splits(
        data,
        val_fraction,
        seed,
        train_fraction,
        dataset,
        dataset,
        (skipped, skipped),
        labelled=False,
    )


def _open_image_folder(data: str, split: str, options: DataOptions) -> DataSource:
    if not streams(data, options):
        return _open_in_memory(load_dataset, data, split, options)
    return StreamingFolderSource(
        list_image_folder(Path(data).expanduser(), split),
        augment=options.augment,
        num_workers=options.num_workers,
        max_unreadable_fraction=options.max_unreadable_fraction,
    )


def _image_folder_splits(
    data: str, val_fraction: float, seed: int, options: DataOptions, train_fraction: float
) -> Splits:
    if not streams(data, options):
        return _read_in_memory_splits(
            load_dataset, data, val_fraction, seed, options, train_fraction
        )
    train = _open_image_folder(data, "train", options)
    assert isinstance(train, StreamingFolderSource)
    test = None
    if not train.listing.single_split:
        test = _open_image_folder(data, "test", options)
        if train.info.classes != test.info.classes:
            raise ValueError(_class_mismatch(data, train.info.classes, test.info.classes))
    return streamed_splits(data, train, test, val_fraction, seed, train_fraction)


def streamed_splits(
    data: str,
    train: StreamingFolderSource,
    test: DataSource | None,
    val_fraction: float,
    seed: int,
    train_fraction: float,
) -> Splits:
    """The splits of a streamed source from its train and test sources (test None: a
    single split, whose test split is held out of train), by the rules of ``open_splits``."""
    single_split = test is None
    if test is None:
        logger.warning(
            "%s has no separate test split: holding out %.0f%% of it", data, 100 * HELD_OUT_TEST
        )
        train, test = train.split(HELD_OUT_TEST, seed)
    if train_fraction < 1.0:
        train = train.split(train_fraction, seed)[1]
    val = None
    if val_fraction > 0:
        train, val = train.split(val_fraction, seed)
    logger.info(
        "%s: streaming %d image files from disk, decoded by %d loader worker(s) per process",
        data,
        len(train),
        train.num_workers,
    )
    return Splits(train, val, test, held_out_test=single_split)


def _class_mismatch(data: str, train: list[str] | None, test: list[str] | None) -> str:
    return (
        f"{data}: {differing_classes(train or [], test or [], 'the train split', 'the test split')}; "
        "give both the same class folders"
    )


def _in_memory_splits(
    data: str,
    val_fraction: float,
    seed: int,
    train_fraction: float,
    train: ImageDataset,
    test: ImageDataset,
    skipped: tuple[SkipLog, SkipLog],
    labelled: bool = True,
) -> Splits:
    """``skipped``: the records of the training split (and of its validation part) and of
    the test split, which a single-split source shares."""
    single_split = same_images(train, test)
    if single_split:
        logger.warning(
            "%s has no separate test split: holding out %.0f%% of it", data, 100 * HELD_OUT_TEST
        )
        train, test = train.split(HELD_OUT_TEST, seed)
    if train.classes != test.classes:
        raise ValueError(_class_mismatch(data, train.classes, test.classes))
    if train_fraction < 1.0:
        train = train.split(train_fraction, seed)[1]
        counts = torch.bincount(train.labels, minlength=len(train.classes))
        if (counts == 0).any():
            empty = train.classes[int(torch.nonzero(counts == 0)[0])]
            raise ValueError(
                f"train_fraction {train_fraction} leaves class {empty!r} of {data} without "
                "training images: raise the fraction"
            )
    val = None
    if val_fraction > 0:
        train, val = train.split(val_fraction, seed)
    return Splits(
        InMemorySource(train, labelled, skipped[0]),
        InMemorySource(val, labelled, skipped[0]) if val else None,
        InMemorySource(test, labelled, skipped[1]),
        held_out_test=single_split,
    )


_UNDETECTED = in_memory("other", lambda data: True, load_dataset)
for _kind in (
    in_memory("digits", lambda data: data == "digits", load_dataset),
    SourceKind("shards", is_shards, _open_shards, _shard_splits),
    SourceKind(
        "unlabelled folder",
        _path_test(is_unlabelled_folder),
        # a split of it is only ever opened to be scored or fitted on, which needs labels:
        # load_dataset says so (open_splits splits it for pre-training instead)
        lambda data, split, options: _open_in_memory(load_dataset, data, split, options),
        _unlabelled_splits,
    ),
    in_memory("idx folder", _path_test(is_idx_folder), load_dataset),
    in_memory("CIFAR folder", _path_test(is_cifar_folder), load_dataset),
    in_memory(
        "npz", _path_test(lambda path: path.is_file() and path.suffix == ".npz"), load_dataset
    ),
    SourceKind(IMAGE_FOLDER, is_image_folder, _open_image_folder, _image_folder_splits),
):
    register_source(_kind, before=None)


def as_unlabelled_dataset(images: torch.Tensor) -> ImageDataset:
    """Unlabelled images as a dataset of one placeholder class, so that the stratified splits
    of ``open_splits`` are plain random ones; ``InMemorySource(labelled=False)`` hides it."""
    return ImageDataset(images, torch.zeros(len(images), dtype=torch.long), ["unlabelled"])


def same_images(first: ImageDataset, second: ImageDataset) -> bool:
    """Whether two splits are the same images: a single-split source returns itself for
    every split name."""
    return torch.equal(first.labels, second.labels) and torch.equal(first.images, second.images)
