"""The data layer: every reader on files made here (and on $VITKIT_DATA when set), the shipped
digits, splits, batching and the batched augmentation."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import (
    AugmentConfig,
    BatchTransform,
    ImageDataset,
    iterate_batches,
    load_dataset,
    to_model_input,
)
from vitkit.data.augment import alternating_flips
from vitkit.data.sources import InMemorySource, open_splits

DATA = Path(os.environ.get("VITKIT_DATA", "/nonexistent"))
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason="set VITKIT_DATA to the shared data folder to run this test"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VITKIT_CACHE", str(cache))
    return cache


def numbered_dataset(counts: list[int]) -> ImageDataset:
    """Image i holds the number i in its first two pixels, so any subset can be identified."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    ids = torch.arange(len(labels))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    return ImageDataset(images, labels, [str(c) for c in range(len(counts))])


def ids_of(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


# --- the shipped digits --------------------------------------------------------------------

# UCI optdigits.names: class distribution of the test set that scikit-learn ships.
UCI_DIGITS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_are_the_1797_uci_images_split_80_20_by_class() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    counts = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    assert counts.tolist() == UCI_DIGITS_COUNTS
    assert torch.bincount(test.labels).tolist() == [round(0.2 * n) for n in UCI_DIGITS_COUNTS]
    assert train.classes == [str(d) for d in range(10)]
    assert train.images.shape[1:] == (1, 8, 8)
    assert torch.equal(load_dataset("digits", "val").images, test.images)
    # pixels 0..16 become round(v * 255 / 16); sklearn's first digit (a 0) starts 0,0,5,13,9,1,0,0
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.cat([train.images, test.images]).unique().tolist()) <= allowed
    first_row = torch.tensor([0, 0, 80, 207, 143, 16, 0, 0], dtype=torch.uint8)
    rows = torch.cat([train.images, test.images])[:, 0, 0]
    assert (rows == first_row).all(dim=1).any()


# --- ImageDataset and batches ----------------------------------------------------------------


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    data = numbered_dataset([50, 30, 20])
    rest, held = data.split(0.2, seed=3)
    assert torch.bincount(held.labels).tolist() == [10, 6, 4]
    assert sorted(ids_of(rest.images) + ids_of(held.images)) == list(range(100))
    assert ids_of(data.split(0.2, seed=3)[1].images) == ids_of(held.images)
    assert ids_of(data.split(0.2, seed=4)[1].images) != ids_of(held.images)
    with pytest.raises(ValueError, match="fraction"):
        data.split(1.0, seed=0)


def test_dataset_rejects_inconsistent_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["a"])


def test_batches_cover_the_epoch_in_an_order_fixed_by_seed_and_epoch() -> None:
    data = numbered_dataset([7, 6])

    def order(**kw: int) -> list[int]:
        batches = iterate_batches(data, 4, shuffle=True, **kw)
        return [i for images, _ in batches for i in ids_of(images)]

    first = order(seed=1, epoch=0)
    assert sorted(first) == list(range(13))
    assert order(seed=1, epoch=0) == first
    assert order(seed=1, epoch=1) != first
    assert order(seed=2, epoch=0) != first
    in_order = iterate_batches(data, 5, shuffle=False, seed=0, epoch=0, drop_last=True)
    assert [ids_of(images) for images, _ in in_order] == [list(range(5)), list(range(5, 10))]


def test_ranks_get_interleaved_shards_with_equal_step_counts() -> None:
    data = numbered_dataset([7, 7])  # 14 images over 4 ranks: padded to 16

    def shard(rank: int) -> list[list[int]]:
        batches = iterate_batches(data, 2, shuffle=True, seed=5, epoch=2, rank=rank, world_size=4)
        return [ids_of(images) for images, _ in batches]

    single = [i for batch in shard(0) for i in batch]
    everything = [
        i
        for images, _ in iterate_batches(data, 14, shuffle=True, seed=5, epoch=2)
        for i in ids_of(images)
    ]
    padded = everything + everything[:2]
    assert single == padded[0::4]
    shards = [shard(rank) for rank in range(4)]
    assert {len(s) for s in shards} == {2}
    assert {i for s in shards for batch in s for i in batch} == set(range(14))
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(data, 2, shuffle=False, seed=0, epoch=0, rank=4, world_size=4))


# --- readers on files made here ----------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """The idx format as documented on the MNIST page: 0, 0, type 0x08, rank, big-endian sizes."""
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder(tmp_path: Path, compress: bool) -> None:
    suffix = ".gz" if compress else ""
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_images, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.array([0, 1, 2, 1, 0]), compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", train_images[:2], compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.array([2, 2]), compress)
    train = load_dataset(tmp_path, "train")
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_images))
    assert train.labels.tolist() == [0, 1, 2, 1, 0]
    assert train.classes == ["0", "1", "2"]
    assert load_dataset(tmp_path, "test").labels.tolist() == [2, 2]
    assert load_dataset(tmp_path, "val").labels.tolist() == [2, 2]


def test_idx_corruption_is_reported(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3, 3)), compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2), compress=False)
    images_file = tmp_path / "train-images-idx3-ubyte"
    images_file.write_bytes(images_file.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset(tmp_path)
    images_file.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="magic"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="no 'test' split"):
        load_dataset(tmp_path, "test")


def write_pickle(path: Path, content: dict[bytes, object]) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def cifar_rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def test_cifar10_pickles(tmp_path: Path) -> None:
    # The CIFAR page: each row holds 1024 red, then 1024 green, then 1024 blue values, row-major.
    for i in range(1, 6):
        write_pickle(tmp_path / f"data_batch_{i}", {b"data": cifar_rows(2, i), b"labels": [i, 0]})
    test_rows = cifar_rows(3, 0)
    test_rows[0, 1024 + 32 * 2 + 5] = 201  # green, row 2, column 5 of the first test image
    write_pickle(tmp_path / "test_batch", {b"data": test_rows, b"labels": [9, 8, 7]})
    names = [
        n.encode()
        for n in (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        )
    ]
    write_pickle(tmp_path / "batches.meta", {b"label_names": names})
    train, test = load_dataset(tmp_path, "train"), load_dataset(tmp_path, "test")
    assert len(train) == 10 and train.labels.tolist()[:4] == [1, 0, 2, 0]
    assert train.classes[9] == "truck"
    assert test.images[0, 1, 2, 5] == 201
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(test_rows))


def test_cifar100_pickles_use_fine_labels(tmp_path: Path) -> None:
    for split, rows in (("train", 4), ("test", 2)):
        write_pickle(
            tmp_path / split,
            {
                b"data": cifar_rows(rows, rows),
                b"fine_labels": [3] * rows,
                b"coarse_labels": [1] * rows,
            },
        )
    write_pickle(tmp_path / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    test = load_dataset(tmp_path, "val")
    assert test.labels.tolist() == [3, 3] and len(test.classes) == 100


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    write_pickle(tmp_path / "test_batch", {b"data": Exploit(), b"labels": [0]})
    with pytest.raises(ValueError, match="refusing"):
        load_dataset(tmp_path, "test")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_arrays(tmp_path: Path, layout: str) -> None:
    nchw = np.random.default_rng(1).integers(0, 256, (4, 1 if layout == "NHW" else 3, 5, 6))
    nchw = nchw.astype(np.uint8)
    stored = {"NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw, "NHW": nchw[:, 0]}[layout]
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x_train=stored,
        y_train=np.array([[0], [1], [1], [0]]),
        x_test=stored[:1],
        y_test=np.array([1]),
        classes=np.array(["cat", "dog"]),
    )
    train = load_dataset(path, "train")
    assert torch.equal(train.images, torch.from_numpy(nchw))
    assert train.labels.tolist() == [0, 1, 1, 0] and train.classes == ["cat", "dog"]
    assert len(load_dataset(path, "val")) == 1


def test_npz_single_split_and_bad_dtype(tmp_path: Path) -> None:
    path = tmp_path / "one.npz"
    np.savez(path, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 2, 1]))
    assert load_dataset(path, "test").classes == ["0", "1", "2"]
    np.savez(path, images=np.zeros((3, 4, 4), np.float32), labels=np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(path)


def save_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_with_split_folders_and_a_corrupt_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cat = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    save_image(tmp_path / "train" / "cat" / "a.png", cat)
    save_image(tmp_path / "train" / "dog" / "b.png", cat[::-1].copy())
    save_image(tmp_path / "train" / "dog" / "c.jpg", np.full((6, 5, 3), 90, np.uint8))
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image suffix")
    save_image(tmp_path / "val" / "cat" / "d.png", cat)
    with pytest.warns(
        UserWarning,
        match=r"skipped 1 unreadable .* of 4: dog/broken\.jpg \(cannot identify image file 'broken",
    ) as caught:
        train = load_dataset(tmp_path, "train", max_unreadable_fraction=0.25)
    assert len(caught) == 1
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 1, 1]
    assert torch.equal(train.images[0], torch.from_numpy(cat).permute(2, 0, 1))  # PNG: lossless
    assert (train.images[2].float() - 90).abs().max() <= 2  # JPEG: nearly
    assert len(load_dataset(tmp_path, "test")) == 1  # test falls back to val
    with pytest.warns(UserWarning, match="skipped 1 .*broken"):  # the cached copy names it too
        cached = load_dataset(tmp_path, "train", max_unreadable_fraction=0.25)
        assert torch.equal(cached.images, train.images)


def test_image_folder_cache_follows_the_files(tmp_path: Path, private_cache: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "a" / "1.png", np.zeros((4, 4), np.uint8))
    assert load_dataset(root).images.shape == (1, 1, 4, 4)
    assert len(list(private_cache.glob("*.npz"))) == 1
    save_image(root / "b" / "2.png", np.full((4, 4), 255, np.uint8))
    changed = load_dataset(root)
    assert changed.labels.tolist() == [0, 1] and changed.images[1].min() == 255
    assert len(list(private_cache.glob("*.npz"))) == 2


def test_image_folder_mixed_modes_and_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VITKIT_CACHE", "off")
    save_image(tmp_path / "x" / "grey.png", np.full((4, 4), 7, np.uint8))
    save_image(tmp_path / "x" / "rgb.png", np.full((4, 4, 3), 9, np.uint8))
    save_image(tmp_path / "y" / "big.png", np.full((8, 8, 3), 11, np.uint8))
    with pytest.warns(UserWarning, match="1 images are not 4x4"):
        data = load_dataset(tmp_path)
    assert data.images.shape == (3, 3, 4, 4)
    assert data.images[0].unique().tolist() == [7]  # grey repeated over R, G, B
    assert data.images[2].unique().tolist() == [11]


def test_a_missing_dataset_is_not_said_to_be_decoded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="does not exist"):
        open_splits(str(tmp_path / "missing"), 0.0, 0)
    assert "decoded into memory" not in caplog.text


def test_bad_sources_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*'digits'"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", "validation")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"not an \.npz"):
        load_dataset(tmp_path / "data.csv")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no images"):
        load_dataset(tmp_path / "empty")
    save_image(tmp_path / "only" / "train" / "a" / "1.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"no 'test' split: ask for one of \['train'\]"):
        load_dataset(tmp_path / "only", "test")


# --- augmentation -----------------------------------------------------------------------------


def test_to_model_input_is_the_official_scaling() -> None:
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_model_input(pixels).flatten(), torch.tensor([-1.0, -0.6, 1.0]))


def random_batch(channels: int = 3, size: int = 12, count: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, channels, size, size), generator=generator).byte()


LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])


def test_eval_only_resizes_and_scales() -> None:
    images = random_batch()
    transform = BatchTransform((12, 12), 10, AugmentConfig(label_smoothing=0.1), seed=0)
    scaled, targets = transform(images, LABELS, train=False)
    assert torch.allclose(scaled, to_model_input(images))
    assert torch.equal(targets, torch.nn.functional.one_hot(LABELS, 10).float())
    resized, _ = BatchTransform((24, 24), 10, AugmentConfig(), seed=0)(images, LABELS, False)
    assert resized.shape == (8, 3, 24, 24)
    assert torch.allclose(resized.mean((2, 3)), scaled.mean((2, 3)), atol=0.02)


FULL = AugmentConfig(
    random_resized_crop=True,
    hflip=True,
    randaugment=(2, 15),
    mixup=0.8,
    cutmix=1.0,
    label_smoothing=0.1,
)


@pytest.mark.parametrize("channels", [1, 3])
def test_training_batches_are_reproducible_from_the_seed(channels: int) -> None:
    images = random_batch(channels)
    global_state = torch.get_rng_state()
    first = BatchTransform((16, 16), 10, FULL, seed=7)
    a, targets_a = first(images, LABELS, train=True)
    b, _ = BatchTransform((16, 16), 10, FULL, seed=7)(images, LABELS, train=True)
    c, _ = BatchTransform((16, 16), 10, FULL, seed=8)(images, LABELS, train=True)
    assert torch.equal(torch.get_rng_state(), global_state)  # the caller's randomness is untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, channels, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(targets_a.sum(1), torch.ones(8))
    saved = first.state_dict()
    next_a, _ = first(images, LABELS, train=True)
    assert not torch.equal(next_a, a)  # each batch is augmented afresh
    resumed = BatchTransform((16, 16), 10, FULL, seed=0)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed(images, LABELS, train=True)[0], next_a)


def test_label_smoothing_targets() -> None:
    transform = BatchTransform((12, 12), 4, AugmentConfig(label_smoothing=0.2), seed=0)
    _, targets = transform(random_batch(count=2), torch.tensor([1, 3]), train=True)
    expected = torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]])
    assert torch.allclose(targets, expected)


def test_hflip_mirrors_some_images_and_keeps_the_others() -> None:
    images = random_batch(count=16)
    out, _ = BatchTransform((12, 12), 16, AugmentConfig(hflip=True), seed=1)(
        images, torch.arange(16), train=True
    )
    scaled = to_model_input(images)
    same = torch.isclose(out, scaled).flatten(1).all(1)
    mirrored = torch.isclose(out, scaled.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_alternating_flips_mirror_each_image_in_one_of_every_two_epochs() -> None:
    """Each image comes out as itself or its mirror; of epochs 0 and 1 it is mirrored in
    exactly one, epoch 2 repeats epoch 0; the choice goes with the image's index, not its
    place in the batch, and another seed chooses other images."""
    images, count = random_batch(count=64), 64
    labels, indices = torch.zeros(count, dtype=torch.long), torch.arange(500, 500 + count)
    scaled = to_model_input(images)
    augment = AugmentConfig(hflip=True, alternate_flips=True)

    def mirrored(seed: int, epoch: int, order: torch.Tensor) -> torch.Tensor:
        transform = BatchTransform((12, 12), 10, augment, seed=seed)
        out, _ = transform(images[order], labels, train=True, image_ids=indices[order], epoch=epoch)
        same = torch.isclose(out, scaled[order]).flatten(1).all(1)
        flipped = torch.isclose(out, scaled[order].flip(-1)).flatten(1).all(1)
        assert (same ^ flipped).all()
        return flipped

    in_order = torch.arange(count)
    first, second, third = (mirrored(0, epoch, in_order) for epoch in (0, 1, 2))
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert 16 <= int(first.sum()) <= 48  # a fair coin: P(outside) < 1e-4
    shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mirrored(0, 0, shuffled), first[shuffled])
    assert not torch.equal(mirrored(1, 0, in_order), first)


def test_the_alternating_flip_coin_is_fair_and_unrelated_between_neighbours() -> None:
    """Over 20,000 consecutive indices: half heads, half of the neighbours agree, and two
    seeds agree on half the images (binomial: each within 4 standard deviations, 0.014)."""
    indices = torch.arange(20_000)
    coin = alternating_flips(indices, 0, seed=3).float()
    assert abs(coin.mean() - 0.5) < 0.014
    assert abs((coin[1:] == coin[:-1]).float().mean() - 0.5) < 0.014
    other = alternating_flips(indices, 0, seed=4).float()
    assert abs((coin == other).float().mean() - 0.5) < 0.014
    assert torch.equal(alternating_flips(indices, 7, seed=3), ~coin.bool())


def test_alternating_flips_need_hflip_and_the_images_indices() -> None:
    with pytest.raises(ValueError, match="set hflip too"):
        AugmentConfig(alternate_flips=True)
    transform = BatchTransform(
        (12, 12), 10, AugmentConfig(hflip=True, alternate_flips=True), seed=0
    )
    with pytest.raises(ValueError, match="a number per training image that stays the same"):
        transform(random_batch(), LABELS, train=True)


def test_in_memory_training_batches_carry_their_indices_and_epoch() -> None:
    dataset = numbered_dataset([7, 6, 7])
    batches = list(InMemorySource(dataset).train_batches(4, seed=1, epoch=3))
    assert len(batches) == 5
    for batch in batches:
        assert batch.image_ids is not None and batch.epoch == 3
        assert ids_of(batch.images) == batch.image_ids.tolist()


def test_translate_shifts_each_image_by_at_most_the_padding() -> None:
    """Each output is its input shifted by some (dy, dx) with |dy|, |dx| <= 2: the pixels the
    shift keeps inside the frame match exactly; the shifts are not all the same."""
    images = random_batch(count=16)
    out, _ = BatchTransform((12, 12), 16, AugmentConfig(translate=2), seed=5)(
        images, torch.arange(16), train=True
    )
    scaled = to_model_input(images)
    shifts = []
    for image, result in zip(scaled, out, strict=True):
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(
                result[:, max(dy, 0) : 12 + min(dy, 0), max(dx, 0) : 12 + min(dx, 0)],
                image[:, max(-dy, 0) : 12 + min(-dy, 0), max(-dx, 0) : 12 + min(-dx, 0)],
                atol=1e-5,
            )
        ]
        assert found, "an image is not a shift of its input by at most 2 pixels"
        shifts.append(found[0])
    assert len(set(shifts)) > 3


def test_mixup_mixes_images_and_labels_with_the_same_lam() -> None:
    images = random_batch()
    out, targets = BatchTransform((12, 12), 8, AugmentConfig(mixup=1.0), seed=3)(
        images, LABELS, train=True
    )
    lam = targets[0, 0]  # image 0 (label 0) is mixed with image 7 (label 7)
    assert torch.isclose(targets[0, 7], 1 - lam) and 0 < lam < 1
    x = images.float() / 255
    assert torch.allclose((out + 1) / 2, lam * x + (1 - lam) * x.flip(0), atol=1e-5)


def test_mixup_and_cutmix_weaken_with_the_regularization_strength() -> None:
    """Progressive resizing's adaptive regularization scales both Beta alphas: at strength 0
    neither mixes, and at a quarter of alpha 4 mixup's lam lies as far from 1/2 as Beta(1, 1)'s
    does on average (1/4), not as close as Beta(4, 4)'s (0.137)."""
    images = random_batch()
    transform = BatchTransform((12, 12), 8, AugmentConfig(mixup=4.0, cutmix=4.0), seed=3)
    transform.set_regularization(0.0)
    out, targets = transform(images, LABELS, train=True)
    assert torch.equal(targets, torch.eye(8)[LABELS])
    assert torch.allclose(out, to_model_input(images), atol=1e-5)
    mixing = BatchTransform((12, 12), 8, AugmentConfig(mixup=4.0), seed=5)
    mixing.set_regularization(0.25)
    lams = torch.stack([mixing(images, LABELS, train=True)[1][0, 0] for _ in range(400)])
    assert abs((lams - 0.5).abs().mean() - 0.25) < 0.03


def test_randaugment_transforms_the_share_of_images_the_regularization_strength_says() -> None:
    images = random_batch(count=400)
    transform = BatchTransform((12, 12), 8, AugmentConfig(randaugment=(2, 9)), seed=0)
    changed = []
    for strength in (0.0, 0.5, 1.0):
        transform.set_regularization(strength)
        out, _ = transform(images, torch.zeros(400, dtype=torch.long), train=True)
        changed.append((out - to_model_input(images)).abs().flatten(1).amax(1).gt(1e-4))
    assert not changed[0].any()
    assert 0.4 < changed[1].float().mean() < 0.6  # 200 expected, sd 10
    # Two operations a picture leave an image unchanged only where both were mild
    # (auto-contrast of a full-range image, a rotation by a fraction of a degree...).
    assert changed[2].float().mean() > 0.9


def test_cutmix_pastes_a_box_whose_area_matches_the_labels() -> None:
    images = random_batch(size=32)
    out, targets = BatchTransform((32, 32), 8, AugmentConfig(cutmix=1.0), seed=4)(
        images, LABELS, train=True
    )
    x = to_model_input(images)
    from_other = torch.isclose(out, x.flip(0)).all(1) & ~torch.isclose(out, x).all(1)
    pasted_fraction = from_other[0].float().mean()
    assert torch.isclose(targets[0, 7], pasted_fraction, atol=1 / 1024)
    assert torch.isclose(targets[0, 0], 1 - pasted_fraction, atol=1 / 1024)
    rows, cols = torch.nonzero(from_other[0], as_tuple=True)
    assert len(rows) > 0
    box = from_other[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all()  # the pasted region is one rectangle


def test_grey_images_can_feed_an_rgb_model() -> None:
    out, _ = BatchTransform((8, 8), 8, AugmentConfig(), seed=0, channels=3)(
        random_batch(channels=1, size=8), LABELS, train=False
    )
    assert out.shape == (8, 3, 8, 8) and torch.equal(out[:, 0], out[:, 2])


def test_bad_augment_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="randaugment"):
        AugmentConfig(randaugment=(2, 30))
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform((8, 8), 2, AugmentConfig(), seed=0)(
            torch.zeros(1, 1, 8, 8), LABELS[:1], True
        )


# --- the shared real data ---------------------------------------------------------------------

# yann.lecun.com/exdb/mnist (and torchvision's docs): training images per digit
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@needs_data
def test_shared_mnist() -> None:
    train, test = load_dataset(DATA / "mnist", "train"), load_dataset(DATA / "mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS


@needs_data
def test_shared_cifar10_jpeg_folder() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every image is readable
        test = load_dataset(DATA / "cifar10-jpg", "test")
    assert test.images.shape == (10000, 3, 32, 32)
    assert test.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# ------------------------------------------------------------------- damaged files (issue 14)
def test_truncated_mnist_gz_is_named(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 3, 3)), compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2), compress=True)
    images_file = tmp_path / "train-images-idx3-ubyte.gz"
    images_file.write_bytes(images_file.read_bytes()[:-9])  # cut into the gzip trailer
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is a truncated or corrupt"):
        load_dataset(tmp_path)


def test_damaged_decode_cache_is_named_and_rebuilt(tmp_path: Path, private_cache: Path) -> None:
    root = tmp_path / "images"
    save_image(root / "a" / "1.png", np.full((4, 4), 40, np.uint8))
    expected = load_dataset(root).images
    (cache,) = private_cache.glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"{cache}.* damaged .*rebuilding it"):
        assert torch.equal(load_dataset(root).images, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: read back without a word
        assert torch.equal(load_dataset(root).images, expected)


def test_decompression_bomb_is_skipped_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_image(tmp_path / "a" / "small.png", np.zeros((4, 4), np.uint8))
    save_image(tmp_path / "b" / "huge.png", np.zeros((4, 12), np.uint8))
    # Pillow refuses images over twice MAX_IMAGE_PIXELS (a warning between one and two times)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    with pytest.warns(UserWarning, match=r"skipped 1 .* of 2: b/huge\.png \(.*decompression bomb"):
        data = load_dataset(tmp_path, max_unreadable_fraction=0.5)
    assert len(data) == 1 and data.classes == ["a", "b"]


def test_skipped_images_are_named_once_however_often_loaded(tmp_path: Path) -> None:
    save_image(tmp_path / "a" / "good.png", np.zeros((4, 4), np.uint8))
    for i in range(5):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own setting for UserWarning
        load_dataset(tmp_path, "train", max_unreadable_fraction=1)
        load_dataset(tmp_path, "test", max_unreadable_fraction=1)  # the same images again
    (warning,) = [str(w.message) for w in caught]
    assert "skipped 5 unreadable or corrupt image(s) of 6: a/bad0.png" in warning
    assert "a/bad2.png" in warning and "a/bad3.png" not in warning
    assert warning.endswith("; and 2 more")


def test_cifar_folder_with_some_batches_names_the_missing_ones(tmp_path: Path) -> None:
    write_pickle(tmp_path / "data_batch_1", {b"data": cifar_rows(2, 1), b"labels": [1, 0]})
    with pytest.raises(ValueError, match=r"part of CIFAR10: it lacks data_batch_2, .*test_batch"):
        load_dataset(tmp_path)


def test_npz_of_pickled_objects_never_suggests_allow_pickle(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, images=np.array([None, 1], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(
        ValueError, match=r"not a readable \.npz file \(it is no zip of plain arrays"
    ) as err:
        load_dataset(path)
    assert "allow_pickle" not in str(err.value)
    path.write_text("not an npz")  # numpy takes any non-zip for a pickle and says so too
    with pytest.raises(ValueError, match="no zip of plain arrays") as err:
        load_dataset(path)
    assert "allow_pickle" not in str(err.value)
