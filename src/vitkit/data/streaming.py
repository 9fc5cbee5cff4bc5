"""Image folders streamed from disk: files are listed, then decoded in ``DataLoader`` worker
processes as batches are needed, so memory does not grow with the folder.

Each image becomes a model-size crop in the worker, decoded with ``read_image``'s code
(``open_image``/``upright``: EXIF orientation, every mode to RGB) at a reduced size when a
JPEG is much larger than the crop needs (Pillow's draft mode):

- training: a random-resized crop of the *original* image, with its own aspect ratio (area
  fraction ``crop_scale``, aspect ratio ``crop_ratio``, as Inception and timm), resized to the
  model's size; flip, RandAugment and mixup / cutmix follow on the batch (``BatchTransform``);
- evaluation: the model's ``EvalPreprocessing`` (``set_image_size``): by default the whole
  image resized to the model's size; or the centre crop of ``crop_pct`` of the shorter side.
  ``vitkit predict`` reads a file with the same function (``load_view``, through
  ``read_eval_image``), so a file gives the same model input in both.

Every random draw of an image comes from ``(seed, epoch, index)``, so the crops are the same
whichever worker (or how many) decodes them, and a resumed run sees exactly the images an
uninterrupted one would. A file that cannot be decoded is skipped: in training the next file
of the folder takes its place (the batch keeps its size, the order stays deterministic), in
evaluation it is left out; either way it is counted (``SkipLog``).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitkit.data.augment import AugmentConfig
from vitkit.data.base import (
    MAX_UNREADABLE_FRACTION,
    Batch,
    EncodedSample,
    SkipLog,
    SourceInfo,
    default_workers,
)
from vitkit.data.datasets import batch_indices, stratified_split
from vitkit.data.folders import FolderListing
from vitkit.data.images import UnreadableImage, open_image, preprocess, upright, upright_size
from vitkit.models.preprocessing import EvalPreprocessing

DRAFT_FACTOR = 2  # decode a JPEG at a reduced size once it is twice as large as needed
MAX_SUBSTITUTES = 100  # consecutive unreadable files before a training batch gives up


@dataclass(frozen=True)
class View:
    """How one image becomes a model input: ``size`` (height, width); a random-resized crop
    with ``scale`` / ``ratio`` when ``random``, else the geometry of ``preprocessing`` (the
    evaluation contract); ``channels`` 3 (RGB) or 1 (grey)."""

    size: tuple[int, int]
    random: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    channels: int = 3
    preprocessing: EvalPreprocessing = field(default_factory=EvalPreprocessing)

    @classmethod
    def training(
        cls,
        size: tuple[int, int],
        augment: AugmentConfig,
        preprocessing: EvalPreprocessing | None = None,
    ) -> View:
        """The training view of ``augment``: its random-resized crop, else the evaluation
        geometry of ``preprocessing``."""
        return cls(
            size,
            augment.random_resized_crop,
            augment.crop_scale,
            augment.crop_ratio,
            preprocessing=preprocessing or EvalPreprocessing(),
        )


def random_box(
    width: int, height: int, view: View, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """(left, top, width, height) of a random-resized crop: area fraction in ``view.scale``,
    aspect ratio (width / height) log-uniform in ``view.ratio``; ten tries, then the centre
    crop with the ratio clamped to the range (the Inception recipe, as timm draws it)."""
    area = width * height
    log_ratio = np.log(view.ratio)
    for _ in range(10):
        target = area * rng.uniform(*view.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (
                float(rng.integers(0, width - w + 1)),
                float(rng.integers(0, height - h + 1)),
                w,
                h,
            )
    aspect = min(max(width / height, view.ratio[0]), view.ratio[1])
    box_w, box_h = (
        (float(width), width / aspect)
        if width / height < aspect
        else (height * aspect, float(height))
    )
    return (width - box_w) / 2, (height - box_h) / 2, box_w, box_h


def load_view(
    file: str | Path | BinaryIO, view: View, rng: np.random.Generator, name: str | None = None
) -> np.ndarray:
    """One image as the (C, H, W) uint8 crop ``view`` describes; ``UnreadableImage`` if it
    cannot be decoded. The crop box is chosen from the header's size, so a large JPEG is
    decoded only as large as the box needs."""
    height_out, width_out = view.size
    with open_image(file, name) as image:
        width, height = upright_size(image)
        if view.random:
            left, top, w, h = random_box(width, height, view, rng)
        else:
            left, top, w, h = view.preprocessing.box(width, height, view.size)
        factor = min(w / width_out, h / height_out)
        draft = None
        if factor >= DRAFT_FACTOR:
            draft = (math.ceil(width / factor), math.ceil(height / factor))
        picture = upright(image, draft)
        sx, sy = picture.width / width, picture.height / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        crop = picture.resize((width_out, height_out), Image.Resampling.BILINEAR, box=box)
        if view.channels == 1:
            return np.asarray(crop.convert("L"))[None]
        return np.asarray(crop.convert("RGB")).transpose(2, 0, 1)


def read_eval_image(
    file: str | Path | BinaryIO,
    size: tuple[int, int],
    preprocessing: EvalPreprocessing,
    name: str | None = None,
) -> torch.Tensor:
    """One image file as the uint8 RGB (1, 3, H, W) evaluation input of ``size``, exactly as a
    streamed folder's workers make it (``load_view``); ``preprocess(..., prepared=True)``
    scales it. Raises ``FileNotFoundError`` or ``UnreadableImage`` (a ``ValueError``)."""
    view = View((int(size[0]), int(size[1])), preprocessing=preprocessing)
    return torch.from_numpy(load_view(file, view, sample_rng(0, 0, 0), name).copy()).unsqueeze(0)


def preprocess_file(path: str | Path, cfg: Any) -> torch.Tensor:
    """The model input (1, C, H, W) of one image file for a model with config ``cfg`` (its
    ``img_size``, ``in_chans`` and recorded ``EvalPreprocessing``): what ``vitkit predict``
    and a streamed ``vitkit eval`` feed the model for that file."""
    preprocessing = EvalPreprocessing.of(cfg)
    pixels = read_eval_image(path, cfg.img_size, preprocessing)
    return preprocess(pixels, cfg.img_size, cfg.in_chans, preprocessing, prepared=True)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def make_loader(dataset: Any, sampler: Any, workers: int) -> DataLoader:
    """A loader whose items are whole batches made by one worker (``batch_size=None``)."""
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers)


@dataclass
class FolderBatches:
    """What the loader's workers run: indices of a batch in, decoded batch out, with the
    names of the files that could not be decoded."""

    root: str
    files: np.ndarray  # bytes paths relative to root: no per-file Python objects to copy
    labels: torch.Tensor
    view: View
    seed: int
    epoch: int
    substitute: bool  # training: the next file takes an unreadable one's place

    def open(self, chosen: int) -> str | BinaryIO:
        """The file of image ``chosen``, for ``load_view`` (a subclass reads another store)."""
        return f"{self.root}/{self.files[chosen].decode()}"

    def __getitem__(
        self, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
        """(images, labels, their positions in the split, their names, the unreadable)."""
        images, labels, positions, names, skipped = [], [], [], [], []
        for index in indices.tolist():
            for attempt in range(MAX_SUBSTITUTES if self.substitute else 1):
                chosen = (index + attempt) % len(self.files)
                name = self.files[chosen].decode()
                try:
                    rng = sample_rng(self.seed, self.epoch, chosen)
                    images.append(load_view(self.open(chosen), self.view, rng, name))
                    labels.append(int(self.labels[chosen]))
                    positions.append(chosen)
                    names.append(name)
                    break
                except (UnreadableImage, FileNotFoundError) as err:
                    skipped.append(f"{name} ({getattr(err, 'reason', err)})")
            else:
                if self.substitute:
                    raise ValueError(
                        f"{self.root}: {MAX_SUBSTITUTES} files in a row could not be decoded "
                        f"({'; '.join(skipped[-3:])}): is this an image folder?"
                    )
        stacked = (
            torch.from_numpy(np.stack(images))
            if images
            else torch.empty(0, 3, *self.view.size, dtype=torch.uint8)
        )
        labelled = torch.tensor(labels, dtype=torch.int64)
        return stacked, labelled, torch.tensor(positions, dtype=torch.int64), names, skipped


class StreamingFolderSource:
    """A ``DataSource`` over an image folder, decoded as batches are needed (module docstring).

    It holds the file names (as one bytes array) and the labels, never pixels. Images are
    always RGB (grey files repeated): the channel count must be known before any decoding.
    """

    def __init__(
        self,
        listing: FolderListing,
        *,
        augment: AugmentConfig | None = None,
        num_workers: int | None = None,
        indices: torch.Tensor | None = None,
        skipped: SkipLog | None = None,
        max_unreadable_fraction: float = MAX_UNREADABLE_FRACTION,
    ) -> None:
        self.listing = listing
        all_labels = torch.tensor(listing.labels, dtype=torch.int64)
        indices = torch.arange(len(all_labels)) if indices is None else indices
        self.indices = indices
        self.files = np.array([listing.files[i].encode() for i in indices.tolist()])
        self.labels = all_labels[indices]
        self.augment = augment or AugmentConfig()
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.size: tuple[int, int] | None = None
        self.preprocessing = EvalPreprocessing()
        # one record for the whole listing, shared by its subsets (the held-out splits)
        total = len(listing.files)
        self.skipped = skipped or SkipLog(str(listing.root), total, max_unreadable_fraction)

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(list(self.listing.classes), 3, len(self))

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, fraction: float, seed: int) -> tuple[StreamingFolderSource, ...]:
        """(rest, held-out ``fraction``), stratified: the same images ``ImageDataset.split``
        would hold out of this folder."""
        parts = stratified_split(self.labels, len(self.listing.classes), fraction, seed)
        return tuple(self.subset(part) for part in parts)

    def subset(self, part: torch.Tensor) -> StreamingFolderSource:
        """The images at positions ``part`` of this source (sharing its skip record)."""
        subset = copy.copy(self)  # its settings, image size and skip record (a subclass's too)
        subset.indices, subset.files = self.indices[part], self.files[part.numpy()]
        subset.labels = self.labels[part]
        return subset

    def set_image_size(
        self, size: tuple[int, int], preprocessing: EvalPreprocessing | None = None
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.preprocessing = preprocessing or EvalPreprocessing()

    def encoded_samples(self) -> Iterator[EncodedSample]:
        """Each file's bytes as they are (no decoding, no re-encoding), with its label. A file
        whose header Pillow cannot read (empty, text, another format) is skipped and counted
        as training would skip it; one damaged further in is only found when it is decoded."""
        for name, label in zip(self.files, self.labels.tolist(), strict=True):
            path = Path(self.listing.root, name.decode())
            data = path.read_bytes()
            try:
                with open_image(io.BytesIO(data), name.decode()):
                    pass
            except UnreadableImage as err:
                self.skipped.add([f"{name.decode()} ({err.reason})"])
                continue
            yield EncodedSample(path.suffix[1:].lower(), data, label)

    def _batches(
        self, plan: Iterator[torch.Tensor], view: View, seed: int, epoch: int, train: bool
    ) -> Iterator[Batch]:
        dataset = self._reader(view, seed, epoch, train)
        root = self.listing.root
        loader = make_loader(dataset, list(plan), self.num_workers)
        for images, labels, positions, names, skipped in loader:
            self.skipped.add(skipped)
            if len(labels):
                # cropped either way: the training view or the evaluation geometry
                paths = tuple(str(Path(root, n)) for n in names)
                yield Batch(
                    images, labels, cropped=True, names=paths, image_ids=positions, epoch=epoch
                )

    def _reader(self, view: View, seed: int, epoch: int, train: bool) -> FolderBatches:
        """What the loader's workers run for these images (``FolderBatches``)."""
        return FolderBatches(
            str(self.listing.root), self.files, self.labels, view, seed, epoch, substitute=train
        )

    def _size(self) -> tuple[int, int]:
        if self.size is None:
            raise RuntimeError("set_image_size must be called before reading a streamed source")
        return self.size

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
            len(self),
            batch_size,
            shuffle=True,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            drop_last=True,
            start=start,
        )
        view = View.training(self._size(), self.augment, self.preprocessing)
        return self._batches(plan, view, seed, epoch, train=True)

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        mine = torch.arange(rank, len(self), world_size)
        plan = iter(mine.split(batch_size))
        view = View(self._size(), preprocessing=self.preprocessing)
        return self._batches(plan, view, 0, 0, train=False)
