"""An in-memory image dataset and the batches a training loop draws from it.

Everything is held as one uint8 tensor: small vision datasets fit in memory (CIFAR-10 is
150 MB), so an epoch is a permutation and a slice per batch, with no loader workers, and
sharding across ranks is a stride over that permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageDataset:
    """Images (uint8, (N, C, H, W)), labels (int64, (N,)) and class names (index = label)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}"
            )
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must have shape ({len(self.images)},) to match the images, "
                f"got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(
            self.classes
        ):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, "
                f"got [{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], list(self.classes))

    def split(self, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
        """Deterministic, stratified split: (rest, held-out ``fraction``), e.g. for validation
        (``stratified_split``)."""
        rest, held_out = stratified_split(self.labels, len(self.classes), fraction, seed)
        return self.subset(rest), self.subset(held_out)


def stratified_split(
    labels: torch.Tensor, num_classes: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held-out ``fraction``) of ``labels``: each class gives
    ``round(fraction * its count)`` items, chosen by a permutation seeded with ``seed``; both
    parts keep the original order. In-memory and streamed sources split with it, so a
    folder holds out the same images whichever way it is read."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)]
        held_out[chosen[: round(fraction * len(members))]] = True
    return torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()


def differing_classes(
    first: list[str], second: list[str], first_name: str, second_name: str, shown: int = 10
) -> str:
    """Say how two lists of class names differ, naming them (the first ``shown`` of each)."""

    def listed(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > shown else ""
        return ", ".join(map(str, names[:shown])) + more

    return (
        f"{first_name} and {second_name} have different classes: {first_name}: "
        f"[{listed(first)}]; {second_name}: [{listed(second)}]"
    )


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(num_items)`` that depends only on ``(seed, epoch)``."""
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(epoch_seed))


def batch_indices(
    num_items: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[torch.Tensor]:
    """The item indices of each batch of one epoch, for every kind of source.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches. With
    ``world_size > 1`` each rank takes the interleaved shard ``rank::world_size`` of the
    epoch's order and ``batch_size`` is per rank. Every rank must run the same number of steps,
    so the order is first cut (``drop_last``) or wrapped around (otherwise, as PyTorch's
    ``DistributedSampler``) to a multiple of ``world_size``: a few items then appear on two
    ranks, which an exact distributed evaluation has to account for. ``start`` skips the
    epoch's first batches (a run resumed in the middle of an epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    order = epoch_permutation(num_items, seed, epoch) if shuffle else torch.arange(num_items)
    if world_size > 1:
        if drop_last:
            order = order[: len(order) - len(order) % world_size]
        elif len(order):
            padded = -(-len(order) // world_size) * world_size
            order = order.repeat(-(-padded // len(order)))[:padded]
        order = order[rank::world_size]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for first in range(start * batch_size, stop, batch_size):
        yield order[first : first + batch_size]


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches of one epoch, as ``batch_indices`` orders them."""
    for indices in batch_indices(
        len(dataset),
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        start=start,
    ):
        yield dataset.images[indices], dataset.labels[indices]
