"""Sharded datasets: WebDataset tar files (the format timm reads), written by
``vitkit data pack`` and read with the ``webdataset`` library.

A shard folder holds ``<split>-NNNNNN.tar`` files of samples ``<key>.<jpg|png|...>`` (the
encoded image: a folder's files are copied as they are) and ``<key>.cls`` (the label as
text), and ``dataset.json``: class names, channels, and per split the shards with their
sample counts (a run needs the epoch length before it reads a byte).

Reading: every process takes its own shards of the epoch's shard permutation (``seed``,
``epoch``), every loader worker its own shards of those, and samples are shuffled in a buffer
of decoded crops; images are cropped as streamed folders crop them (``load_view``). A rank
reads its shards in a cycle until the epoch's batches are done, so ranks with fewer samples
repeat a few. A sample without a label or with an undecodable image is skipped and counted by
name, and so is each sample a truncated or corrupt shard lost (by its position), against the
split's ``max_unreadable_fraction`` (``SkipLog``). A resumed run skips the shards its workers had finished; the
shards in flight are read again from their start, so up to one shard per worker is repeated
(and the shuffle differs from the uninterrupted run's).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from vitkit.data.augment import AugmentConfig
from vitkit.data.base import (
    MAX_UNREADABLE_FRACTION,
    Batch,
    EncodedSample,
    SkipLog,
    SourceInfo,
    default_workers,
)
from vitkit.data.datasets import epoch_permutation
from vitkit.data.images import UnreadableImage
from vitkit.data.streaming import View, load_view, make_loader, sample_rng
from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.utils.files import TEMP_SUFFIX, atomic_write, is_stale_temp

logger = logging.getLogger(__name__)

INDEX_FILE = "dataset.json"
FORMAT = "vitkit-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
SHUFFLE_BUFFER = 512  # decoded crops per worker (about 75 MB at 224 px)
TAR_OVERHEAD = 1536  # bytes a sample adds beside its data: two 512-byte headers and padding
# What a pack writes: <split>-NNNNNN.tar, first under a temporary name (utils.files)
_SHARD_NAME = re.compile(r"[a-z]+-\d{6}\.tar(\.\d+-[a-z0-9_]+" + re.escape(TEMP_SUFFIX) + ")?")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Shard:
    path: str
    count: int  # samples (images) in it


def parse_size(text: str) -> int:
    """Bytes of a size such as ``500MB``, ``1.5GB``, ``64k`` (powers of 1000) or ``12345``."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"--shard-size {text!r} is no size: write it as 500MB, 2GB or bytes")
    size = float(match[1]) * 1000 ** " kmgt".index(match[2].lower() or " ")
    if size < 1:
        raise ValueError(f"--shard-size must be positive, got {text!r}")
    return int(size)


# --- writing -----------------------------------------------------------------------------


def write_shards(
    splits: dict[str, Any],
    out: Path,
    shard_size: int,
    *,
    classes: list[str],
    channels: int,
    source: str,
    held_out_test: bool,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write each split's ``encoded_samples()`` into ``out/<split>-NNNNNN.tar`` shards of at
    most ``shard_size`` bytes (a larger single image gets a shard of its own), each written
    under a temporary name and renamed, then ``dataset.json``; returns its content.
    ``progress(n)`` is called after each sample."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: give a new folder for the shards")
    if out.exists():
        _clear_interrupted_pack(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = dict(
        format=FORMAT,
        version=1,
        source=source,
        classes=classes,
        channels=channels,
        held_out_test=held_out_test,
        splits={},
    )
    for split, data in splits.items():
        if data is None:
            continue
        packer = _Packer(iter(data.encoded_samples()), shard_size, len(classes), progress)
        shards: list[dict[str, Any]] = []
        while packer.pending is not None:
            name = f"{split}-{len(shards):06d}.tar"
            atomic_write(out / name, packer.fill)
            shards.append({"name": name, "count": packer.filled})
        index["splits"][split] = dict(
            count=packer.written, class_counts=packer.class_counts, shards=shards
        )
    atomic_write(out / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    return index


def _clear_interrupted_pack(out: Path) -> None:
    """Make way in ``out`` for a pack: an empty folder is fine; one holding only what a killed
    pack leaves (shards, finished or under a temporary name, and no ``dataset.json``, which a
    pack writes last) is emptied, with a warning; anything else is refused."""
    entries = list(os.scandir(out))
    leftovers = [e for e in entries if _is_pack_leftover(e)]
    if len(leftovers) < len(entries):
        raise ValueError(
            f"{out} exists and is not an empty folder: give a new folder for the shards"
        )
    if leftovers:
        logger.warning(
            "%s: removing %d file(s) left by an interrupted `vitkit data pack`; packing again",
            out,
            len(leftovers),
        )
    for entry in leftovers:
        os.unlink(entry.path)


def _is_pack_leftover(entry: os.DirEntry) -> bool:
    """A shard, or the temporary file of one whose writer is gone (not a pack running now)."""
    if not entry.is_file(follow_symlinks=False) or not _SHARD_NAME.fullmatch(entry.name):
        return False
    return not entry.name.endswith(TEMP_SUFFIX) or is_stale_temp(entry)


class _Packer:
    """Fills one shard after another from a stream of samples, keys counting on."""

    def __init__(
        self,
        samples: Iterator[EncodedSample],
        shard_size: int,
        num_classes: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.samples, self.shard_size, self.progress = samples, shard_size, progress
        self.pending = next(samples, None)
        self.written = self.filled = 0
        self.class_counts = [0] * num_classes

    def fill(self, path: Path) -> None:
        """Write samples to ``path`` until the next would pass ``shard_size`` (at least one)."""
        self.filled = size = 0
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
            while self.pending is not None:
                sample = self.pending
                size += len(sample.data) + TAR_OVERHEAD
                if self.filled and size > self.shard_size:
                    return
                writer.write(
                    {
                        "__key__": f"{self.written:09d}",
                        sample.ext: sample.data,
                        "cls": str(sample.label).encode(),
                    }
                )
                self.class_counts[sample.label] += 1
                self.written += 1
                self.filled += 1
                if self.progress is not None:
                    self.progress(1)
                self.pending = next(self.samples, None)


# --- finding shards ----------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """What ``dataset.json`` says, with the shards of each split as paths."""

    classes: list[str]
    channels: int
    splits: dict[str, list[Shard]]
    held_out_test: bool


def is_shards(data: str) -> bool:
    """Whether ``--data`` names shards: a folder with a vitkit ``dataset.json``, or tar files
    (a brace pattern such as ``train-{000000..000146}.tar``, or a comma-separated list)."""
    if data.rstrip(",").endswith(".tar") or ".tar," in data:
        return True
    index = Path(data).expanduser() / INDEX_FILE
    return index.is_file() and _read_index_file(index).get("format") == FORMAT


def _read_index_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable shard index ({err})") from None


def read_index(data: str) -> ShardIndex:
    """The shards of ``data``: a shard folder gives its splits as packed; tar files (pattern
    or list) are the train split, and the ``dataset.json`` beside them gives their counts,
    the classes and the other splits."""
    given = None
    folder = Path(data).expanduser()
    if not folder.is_dir():
        given = [
            str(Path(p).expanduser())
            for part in data.split(",")
            if part
            for p in wds.shardlists.expand_urls(part)
        ]
        folder = Path(given[0]).parent
    if not (folder / INDEX_FILE).is_file():
        raise ValueError(
            f"{folder} has no {INDEX_FILE}: shards need the index `vitkit data pack` writes "
            "beside them (class names and sample counts)"
        )
    index = _read_index_file(folder / INDEX_FILE)
    try:
        splits = {
            split: [Shard(str(folder / s["name"]), int(s["count"])) for s in entry["shards"]]
            for split, entry in index["splits"].items()
        }
        classes, channels = [str(c) for c in index["classes"]], int(index["channels"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / INDEX_FILE} lacks {err}: pack the shards again") from None
    if given is not None:
        counts = {s.path: s.count for shards in splits.values() for s in shards}
        unknown = [p for p in given if p not in counts]
        if unknown:
            raise ValueError(
                f"{unknown[0]} is not listed in {folder / INDEX_FILE}: give shards "
                "that `vitkit data pack` wrote, with their index"
            )
        splits["train"] = [Shard(p, counts[p]) for p in given]
    missing = [s.path for shards in splits.values() for s in shards if not Path(s.path).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} shard(s) listed in {folder / INDEX_FILE} are missing, "
            f"e.g. {missing[0]}"
        )
    return ShardIndex(classes, channels, splits, bool(index.get("held_out_test", False)))


# --- reading -----------------------------------------------------------------------------


def _samples(shards: Iterable[Shard], skipped: list[str]) -> Iterator[tuple[str, EncodedSample]]:
    """(shard:key, sample) of ``shards`` in order. Samples without an image or a label are
    appended to ``skipped`` by name and left out, and so is every sample a truncated or
    corrupt shard lost: those its index counts beyond the ones read, each by its position
    (``train-000003.tar: sample 51 of 100 (the shard ends early: truncated)``), so that
    they count against the unreadable fraction as the files of a folder do."""
    errors: list[str] = []  # of the shard being read

    def record(err: Exception) -> bool:
        errors.append(f"{type(err).__name__}: {err.args[0] if err.args else err}")
        return True

    for shard in shards:
        errors.clear()
        read = 0
        file = Path(shard.path).name
        for sample in wds.tarfile_samples([{"url": shard.path}], handler=record):
            read += 1
            name = f"{file}:{sample['__key__']}"
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            try:
                label = int(sample["cls"])
            except (KeyError, ValueError):
                skipped.append(f"{name} (no .cls label)")
                continue
            if ext is None:
                skipped.append(f"{name} (no image)")
                continue
            yield name, EncodedSample(ext, sample[ext], label)
        reason = errors[0] if errors else "the shard ends early: truncated"
        lost = range(read + 1, shard.count + 1)
        skipped.extend(f"{file}: sample {i} of {shard.count} ({reason})" for i in lost)
        if errors and not lost:
            skipped.append(f"{file} ({reason})")


@dataclass
class ShardStream(IterableDataset):
    """One rank's shards, split again among the loader's workers; yields (images, labels,
    image ids, names of what was skipped) batches. A sample's id is the CRC-32 of its name:
    it seeds the sample's crop and stays the same in every epoch (``Batch.image_ids``)."""

    shards: list[Shard]
    view: View
    channels: int
    num_classes: int
    batch_size: int
    seed: int
    epoch: int
    rank: int
    start: int  # batches of this rank already consumed (training)
    train: bool

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
        worker = get_worker_info()
        index, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        skipped: list[str] = []
        seed = int(sample_rng(self.seed, self.epoch, self.rank).integers(2**62)) + index
        shuffle = wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=random.Random(seed))

        def samples() -> Iterator[tuple[np.ndarray, int, int]]:
            for shards in self._passes(self.shards[index::workers], index, workers):
                decoded = self._decode(shards, skipped)
                yield from shuffle(decoded) if self.train else decoded

        stream = samples()
        while True:
            batch = list(islice(stream, self.batch_size))
            if not batch and not skipped:
                return
            images = (
                torch.from_numpy(np.stack([b[0] for b in batch]))
                if batch
                else torch.empty(0, self.channels, *self.view.size, dtype=torch.uint8)
            )
            labels, ids = (torch.tensor([b[i] for b in batch], dtype=torch.int64) for i in (1, 2))
            yield images, labels, ids, skipped[:]
            skipped.clear()

    def _passes(self, mine: list[Shard], index: int, workers: int) -> Iterator[list[Shard]]:
        """The worker's passes over its shards, each shuffled on its own: in evaluation one;
        in training as many as the epoch needs, the first from the first shard this worker
        had not finished when the run was interrupted."""
        if not self.train:
            yield mine
            return
        cycle = sum(shard.count for shard in mine)
        done = len(range(index, self.start, workers)) * self.batch_size % max(cycle, 1)
        first = 0
        while done >= mine[first].count:
            done -= mine[first].count
            first += 1
        yield mine[first:]
        while True:
            yield mine

    def _decode(
        self, shards: list[Shard], skipped: list[str]
    ) -> Iterator[tuple[np.ndarray, int, int]]:
        produced = 0
        for name, sample in _samples(shards, skipped):
            if not 0 <= sample.label < self.num_classes:
                skipped.append(f"{name} (label {sample.label} is not a class index)")
                continue
            image_id = zlib.crc32(name.encode())
            rng = sample_rng(self.seed, self.epoch, image_id)
            try:
                pixels = load_view(io.BytesIO(sample.data), self.view, rng, name)
            except UnreadableImage as err:
                skipped.append(f"{name} ({err.reason})")
                continue
            produced += 1
            yield pixels, sample.label, image_id
        if not produced and self.train:
            raise ValueError(f"no readable sample in the shards {[s.path for s in shards][:3]}")


class ShardSource:
    """A ``DataSource`` over WebDataset shards (module docstring)."""

    def __init__(
        self,
        shards: list[Shard],
        classes: list[str],
        channels: int,
        *,
        augment: AugmentConfig | None = None,
        num_workers: int | None = None,
        skipped: SkipLog | None = None,
        max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
    ) -> None:
        self.shards, self.classes, self.channels = shards, classes, channels
        self.augment = augment or AugmentConfig()
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.size: tuple[int, int] | None = None
        self.preprocessing = EvalPreprocessing()
        folder = str(Path(shards[0].path).parent) if shards else "shards"
        self.skipped = skipped or SkipLog(folder, len(self), max_unreadable_fraction)

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(list(self.classes), self.channels, len(self))

    def __len__(self) -> int:
        return sum(shard.count for shard in self.shards)

    def set_image_size(
        self, size: tuple[int, int], preprocessing: EvalPreprocessing | None = None
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.preprocessing = preprocessing or EvalPreprocessing()

    def _read(
        self, shards: list[Shard], batch_size: int, view: View, **stream: Any
    ) -> Iterator[tuple]:
        workers = min(self.num_workers, len(shards))
        dataset = ShardStream(shards, view, self.channels, len(self.classes), batch_size, **stream)
        for images, labels, ids, skipped in make_loader(dataset, None, workers):
            self.skipped.add(skipped)
            if len(labels):
                yield images, labels, ids

    def _view(self, train: bool) -> View:
        if self.size is None:
            raise RuntimeError("set_image_size must be called before reading a streamed source")
        view = (
            View.training(self.size, self.augment, self.preprocessing)
            if train
            else View(self.size, preprocessing=self.preprocessing)
        )
        return dataclasses.replace(view, channels=self.channels)

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
        if len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} training shard(s) cannot feed {world_size} processes: "
                "each process reads its own shards; pack again with a smaller --shard-size"
            )
        order = epoch_permutation(len(self.shards), seed, epoch)
        mine = [self.shards[i] for i in order[rank::world_size].tolist()]
        total = len(self) // world_size // batch_size
        batches = self._read(
            mine,
            batch_size,
            self._view(True),
            seed=seed,
            epoch=epoch,
            rank=rank,
            start=start,
            train=True,
        )
        for images, labels, ids in islice(batches, max(total - start, 0)):
            yield Batch(images, labels, cropped=True, image_ids=ids, epoch=epoch)

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        batches = self._read(
            self.shards[rank::world_size],
            batch_size,
            self._view(False),
            seed=0,
            epoch=0,
            rank=rank,
            start=0,
            train=False,
        )
        for images, labels, _ in batches:
            yield Batch(images, labels, cropped=True)  # the evaluation geometry, in the workers

    def encoded_samples(self) -> Iterator[EncodedSample]:
        """Every sample's image bytes and label, in order (to pack the shards again)."""
        skipped: list[str] = []
        for _, sample in _samples(self.shards, skipped):
            yield sample
        self.skipped.add(skipped)
