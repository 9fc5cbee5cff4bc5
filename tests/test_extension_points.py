"""The extension points: config subclasses, architectures found by config type and described
by themselves, the token hook, the step hook, and the list of data source kinds."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vitkit.checkpoints import FORMATS, load_pretrained, read_checkpoint
from vitkit.checkpoints.core import Checkpoint, CheckpointError, CheckpointFormat
from vitkit.checkpoints.formats import register_format
from vitkit.checkpoints.native import from_pretrained
from vitkit.data import ImageDataset
from vitkit.data.sources import (
    SOURCES,
    SourceKind,
    detect_source,
    in_memory,
    open_splits,
    register_source,
)
from vitkit.models import (
    Architecture,
    Description,
    VisionTransformer,
    ViTConfig,
    architecture_of,
    create_model,
    get_architecture,
    model_config,
    register,
    register_architecture,
    unregister_architecture,
)
from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.training.config import TrainConfig
from vitkit.training.loop import train

MICRO = dict(img_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=3)


@dataclass
class TaggedConfig(ViTConfig):
    """A ViT config with fields of its own, as a plugin's would be."""

    tag: str = "plain"
    scales: tuple[float, ...] = (1.0,)


class TaggedViT(VisionTransformer):
    cfg: TaggedConfig


@pytest.fixture
def tagged() -> Iterator[Architecture]:
    architecture = Architecture("tagged_vit", TaggedConfig, TaggedViT)
    register_architecture(architecture)
    register("tagged_micro", architecture="tagged_vit", tag="micro", **MICRO)
    yield architecture
    unregister_architecture("tagged_vit")


# ------------------------------------------------------------------------- config subclasses


def test_a_config_subclass_round_trips_as_itself(tagged: Architecture, tmp_path: Path) -> None:
    cfg = TaggedConfig(tag="mine", scales=(0.5, 2.0), **MICRO)  # type: ignore[arg-type]
    changed = cfg.replace(tag="other", depth=1)
    assert type(changed) is TaggedConfig and (changed.tag, changed.depth) == ("other", 1)
    assert changed.scales == (0.5, 2.0)
    assert TaggedConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["tag"] == "mine" and cfg.to_dict()["scales"] == [0.5, 2.0]

    model = TaggedViT(cfg)
    folder = model.save_pretrained(tmp_path / "tagged")
    for loaded in (from_pretrained(folder), load_pretrained(folder)):
        assert type(loaded) is TaggedViT and loaded.cfg == cfg
        assert torch.equal(loaded.pos_embed.weight, model.pos_embed.weight)
    # The model's own copies stay its class too (fine-tuning replaces the head).
    model.reset_classifier(5)
    assert type(model.cfg) is TaggedConfig and model.cfg.tag == "mine"
    named = create_model("tagged_micro", depth=1)
    assert type(named) is TaggedViT and named.cfg.tag == "micro"


def test_architecture_of_takes_the_nearest_registered_config_class(tagged: Architecture) -> None:
    @dataclass
    class Unregistered(TaggedConfig):
        pass

    assert architecture_of(TaggedConfig(**MICRO)) is tagged  # type: ignore[arg-type]
    assert architecture_of(Unregistered(**MICRO)) is tagged  # type: ignore[arg-type]
    assert architecture_of(ViTConfig(**MICRO)) is get_architecture("vit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not the config of a registered architecture"):
        architecture_of(EvalPreprocessing())


def test_the_preprocessing_record_refuses_unknown_keys_and_builds_its_class() -> None:
    crop = EvalPreprocessing(resize="crop", crop_pct=0.9)
    assert crop.replace(mean=0.4) == EvalPreprocessing(resize="crop", crop_pct=0.9, mean=0.4)
    with pytest.raises(ValueError, match="colour"):
        EvalPreprocessing.from_dict({"colour": "sepia"})


# -------------------------------------------------------------------------- descriptions


def test_architectures_describe_themselves() -> None:
    vit = ViTConfig(img_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256)
    described = architecture_of(vit).describe(vit)
    assert described.summary == (
        "width 64, depth 2, 4 heads, MLP 256; patch 4x4, image 32x32, 3 channels; "
        "token classifier, learned position embedding; 1000 classes"
    )
    assert described.numerics == "GELU tanh approximation, LayerNorm eps 1e-06"
    assert described.columns == {"width": "64", "depth": "2", "patch": "4x4"}
    assert ("patches", "4x4, grid 8x8") in described.rows

    cnn = create_model("resnetv2_50x1", num_classes=0).cfg
    plain = architecture_of(cnn).describe(cnn)
    assert plain == Description("resnetv2: image 224x224, 3 channels, no head")


def test_a_config_subclass_extends_its_parents_description(tagged: Architecture) -> None:
    @dataclass
    class Described(TaggedConfig):
        def description(self) -> Description:
            base = super().description()
            return dataclasses.replace(base, summary=f"{base.summary}; tagged {self.tag}")

    cfg = Described(tag="x", **MICRO)  # type: ignore[arg-type]
    assert architecture_of(cfg).describe(cfg).summary.endswith("3 classes; tagged x")


# ----------------------------------------------------------------------------- token hook


def micro_vit(**overrides: Any) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**{**MICRO, **overrides})
    nn.init.normal_(model.head.weight)  # type: ignore[union-attr]  # zero-initialised
    return model.eval()


def test_a_masking_token_hook_makes_the_dropped_patches_irrelevant() -> None:
    """MAE-style: keep the [class] token and the first 4 of 16 patches. Pixels of the other
    patches then cannot change the output, those of kept ones do; without the hook they do."""
    model = micro_vit()
    images = torch.randn(2, 3, 16, 16)
    in_dropped, in_kept = images.clone(), images.clone()
    in_dropped[:, :, 8:, :] += 1.0  # patch rows 2-3: dropped
    in_kept[:, :, :4, :] += 1.0  # patch row 0: kept
    with torch.no_grad():
        before = model(images)
        assert not torch.allclose(model(in_dropped), before)
        model.token_hook = lambda tokens: tokens[:, : 1 + 4]
        masked = model(images)
        assert torch.allclose(model(in_dropped), masked)
        assert not torch.allclose(model(in_kept), masked)
        assert model.forward_features(images).shape == (2, 5, 32)


def test_a_token_hook_module_adds_trained_saved_parameters(tmp_path: Path) -> None:
    class AppendToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 1, 32))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([tokens, self.token.expand(len(tokens), -1, -1)], dim=1)

    model = micro_vit(classifier="gap")
    images = torch.randn(2, 3, 16, 16)
    plain = model(images)
    model.token_hook = AppendToken()
    assert "token_hook.token" in model.state_dict()
    assert any(p is model.token_hook.token for p in model.parameters())
    assert model.forward_features(images).shape == (2, 1 + 16, 32)
    assert not torch.allclose(model(images), plain)


def test_the_relative_position_embedding_refuses_a_hook_that_changes_the_count() -> None:
    model = micro_vit(pos_embed="relative")
    model.token_hook = lambda tokens: tokens[:, :3]
    with pytest.raises(ValueError, match="token hook changed the number of tokens"):
        model(torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------------------ step hook


class Recorder:
    """A step hook keeping what it was given: the step and the weights after the step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        assert isinstance(optimizer, torch.optim.Optimizer)
        self.steps.append(step)
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})


class EMATeacher:
    """An exponential moving average of the weights, the teacher of DINO and friends."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.weights: dict[str, torch.Tensor] = {}

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if name not in self.weights:
                    self.weights[name] = value.detach().clone()
                else:
                    self.weights[name].lerp_(value, 1 - self.decay)


def test_step_hooks_see_every_step_and_an_ema_teacher_follows(
    tiny_digits: Any, tmp_path: Path
) -> None:
    recorder, teacher = Recorder(), EMATeacher(decay=0.9)
    values = dict(model="vit_digits", data=str(tiny_digits(64, 20)), out=str(tmp_path / "run"))
    cfg = TrainConfig.from_dict({**values, "steps": 3, "batch_size": 16, "val_fraction": 0.0})
    train(cfg, step_hooks=[recorder, teacher])

    assert recorder.steps == [1, 2, 3]
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    name = "head.weight"
    assert torch.equal(recorder.weights[-1][name], last[name])  # after the step, not before
    assert not torch.equal(recorder.weights[0][name], recorder.weights[1][name])
    expected = recorder.weights[0][name]
    for after in recorder.weights[1:]:
        expected = 0.9 * expected + 0.1 * after[name]
    assert torch.allclose(teacher.weights[name], expected, atol=1e-7)


# ---------------------------------------------------------------------------- data sources


def test_each_built_in_source_is_detected_by_its_kind(tmp_path: Path) -> None:
    npz = tmp_path / "arrays.npz"
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    photos = tmp_path / "photos" / "cat"
    photos.mkdir(parents=True)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.png").write_bytes(b"")
    assert detect_source("digits").name == "digits"
    assert detect_source(str(npz)).name == "npz"
    assert detect_source(str(tmp_path / "photos")).name == "image folder"
    assert detect_source(str(loose)).name == "unlabelled folder"
    assert detect_source("train-{000000..000003}.tar").name == "shards"
    with pytest.raises(ValueError, match="does not exist"):
        open_splits(str(tmp_path / "nothing"), 0.0, 0)


@pytest.fixture
def numbered_source() -> Iterator[SourceKind]:
    """A new kind: ``numbers:N``, N grey images whose pixels are their index, two classes."""

    def read(data: str, split: str, **_: Any) -> ImageDataset:
        count = int(data.removeprefix("numbers:"))
        images = torch.arange(count, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4)
        return ImageDataset(images.clone(), torch.arange(count) % 2, ["even", "odd"])

    kind = in_memory("numbers", lambda data: data.startswith("numbers:"), read)
    register_source(kind)
    yield kind
    SOURCES.remove(kind)


def test_a_registered_source_kind_opens_through_open_splits(numbered_source: SourceKind) -> None:
    assert detect_source("numbers:10") is numbered_source
    splits = open_splits("numbers:10", 0.0, seed=0)
    assert splits.held_out_test  # one split: the test images were held out of it
    seen = [b.images[:, 0, 0, 0] for s in (splits.train, splits.test) for b in s.eval_batches(4)]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))


# ----------------------------------------------------------------------- checkpoint formats


def test_a_registered_checkpoint_format_is_read_before_the_catch_all(tmp_path: Path) -> None:
    """A format of its own: a ``.pth`` file beside a ``FROZEN`` marker holds a torch state
    dict of ``vit_micro``; timm's reader would take the file otherwise."""
    model = create_model("vit_micro")
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    (tmp_path / "FROZEN").touch()

    def read(file: Path, spec: Any) -> Checkpoint:
        return Checkpoint(model_config("vit_micro"), torch.load(file), "frozen")

    fmt = CheckpointFormat("frozen", lambda file: (file.parent / "FROZEN").exists(), read)
    register_format(fmt)
    try:
        assert read_checkpoint(path).format == "frozen"
        loaded = load_pretrained(path)
        assert torch.equal(loaded.head.weight, model.head.weight)  # type: ignore[union-attr]
    finally:
        FORMATS.remove(fmt)
    with pytest.raises(CheckpointError, match="timm ViT state dict"):  # without it: timm's
        read_checkpoint(path)
