"""The architecture registry with a second, test-only architecture: a tiny conv net.

Everything that takes "any registered architecture" is checked with it: create_model, the
save -> load round trip of vitkit's format, ``vitkit models``, ``inspect``, ``convert``,
``eval``, ``predict`` and ``analyze`` (which notes that it has no attention)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import vitkit
from vitkit.analysis import NotApplicable, collect_attentions, position_embedding_similarity
from vitkit.checkpoints import CheckpointError, load_pretrained, read_checkpoint
from vitkit.checkpoints.native import read_metadata
from vitkit.cli import main
from vitkit.data import load_dataset
from vitkit.models import (
    Architecture,
    architecture_of,
    create_model,
    list_models,
    model_config,
    register,
    register_architecture,
    unregister_architecture,
)


@dataclass
class TinyConfig:
    img_size: tuple[int, int] | int = (8, 8)
    in_chans: int = 1
    num_classes: int = 10
    width: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = self.img_size
        self.img_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if self.width < 1:
            raise ValueError(f"width must be at least 1, not {self.width}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "img_size": list(self.img_size)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyConfig:
        return cls(**d)

    def replace(self, **overrides: Any) -> TinyConfig:
        return TinyConfig.from_dict({**self.to_dict(), **overrides})


class TinyConvNet(nn.Module):
    """A 3x3 convolution, global average pooling and a zero-initialised linear head."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv2d(cfg.in_chans, cfg.width, 3, padding=1)
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return pooled if pre_logits or self.head is None else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.cfg = self.cfg.replace(num_classes=num_classes)
        self.head = nn.Linear(self.cfg.width, num_classes) if num_classes else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)


@pytest.fixture
def tiny() -> Iterator[str]:
    """Register the "tiny" architecture and its model "tiny_digits" for one test."""
    register_architecture(Architecture("tiny", TinyConfig, TinyConvNet))
    register("tiny_digits", architecture="tiny", width=6)
    try:
        yield "tiny_digits"
    finally:
        unregister_architecture("tiny")


def randomised(model: nn.Module) -> nn.Module:
    """Every weight random, so a round trip that lost one could not go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------- registry


def test_create_model_builds_the_registered_architecture(tiny: str) -> None:
    model = create_model(tiny, num_classes=3)
    assert isinstance(model, TinyConvNet)
    assert model.cfg == TinyConfig(width=6, num_classes=3)
    assert architecture_of(model).name == "tiny" == architecture_of(model.cfg).name
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    assert tiny in list_models() and list_models("tiny") == [tiny]
    assert "vit_b16" in list_models() and "vit_b16" not in list_models("tiny")
    assert architecture_of(create_model("vit_micro")).name == "vit"


def test_unregister_removes_the_architecture_and_its_models(tiny: str) -> None:
    unregister_architecture("tiny")
    assert tiny not in list_models()
    with pytest.raises(ValueError, match="unknown model 'tiny_digits'"):
        model_config(tiny)
    register_architecture(Architecture("tiny", TinyConfig, TinyConvNet))  # for the fixture


def test_registration_is_checked_at_once(tiny: str) -> None:
    with pytest.raises(ValueError, match="width must be at least 1"):
        register("tiny_broken", architecture="tiny", width=0)
    with pytest.raises(TypeError):
        register("tiny_typo", architecture="tiny", widht=4)
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        register("x", architecture="nope")
    with pytest.raises(ValueError, match="registered twice"):
        register(tiny, architecture="tiny")
    with pytest.raises(ValueError, match="registered twice"):
        register_architecture(Architecture("tiny", TinyConfig, TinyConvNet))
    with pytest.raises(ValueError, match="share the config class"):
        register_architecture(Architecture("tiny2", TinyConfig, TinyConvNet))
    assert "tiny_broken" not in list_models() and "tiny_typo" not in list_models()


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("shape", ["folder", "file.safetensors"])
def test_save_load_round_trip_of_another_architecture(tiny: str, shape: str, tmp_path) -> None:
    model = randomised(create_model(tiny, extra={"classes": list("abcdefghij")}))
    path = vitkit.save_pretrained(model, tmp_path / shape)
    x = torch.randn(2, 1, 8, 8)
    for loaded in (vitkit.from_pretrained(path), load_pretrained(path)):
        assert isinstance(loaded, TinyConvNet) and loaded.cfg == model.cfg
        assert torch.equal(loaded(x), model(x))
    weights = path if shape.endswith(".safetensors") else path / "model.safetensors"
    assert read_metadata(weights)["vitkit_architecture"] == "tiny"
    if shape == "folder":
        assert json.loads((path / "config.json").read_text())["architecture"] == "tiny"


def test_overrides_apply_to_another_architecture(tiny: str, tmp_path: Path) -> None:
    path = vitkit.save_pretrained(randomised(create_model(tiny)), tmp_path / "m.safetensors")
    model = load_pretrained(path, num_classes=4, img_size=16)
    assert model.cfg.num_classes == 4 and model.cfg.img_size == (16, 16)
    assert torch.equal(model.head.weight, torch.zeros(4, 6))  # the fresh head is zero


def test_a_file_without_an_architecture_is_a_vit(tmp_path: Path) -> None:
    """What vitkit wrote before it recorded architectures: only the config in the metadata."""
    model = create_model("vit_micro")
    config = json.dumps(model.cfg.to_dict())
    save_file(
        dict(model.state_dict()), str(tmp_path / "old.safetensors"), {"vitkit_config": config}
    )
    loaded = load_pretrained(tmp_path / "old.safetensors")
    assert isinstance(loaded, vitkit.VisionTransformer) and loaded.cfg == model.cfg


def test_an_unregistered_architecture_is_named(tiny: str, tmp_path: Path) -> None:
    path = vitkit.save_pretrained(create_model(tiny), tmp_path / "m.safetensors")
    unregister_architecture("tiny")
    try:
        with pytest.raises(CheckpointError, match="unknown architecture 'tiny'"):
            read_checkpoint(path)
    finally:
        register_architecture(Architecture("tiny", TinyConfig, TinyConvNet))


def test_vit_only_formats_refuse_another_architecture(tiny: str, tmp_path: Path) -> None:
    model = create_model(tiny)
    with pytest.raises(CheckpointError, match="holds vit models; this is a 'tiny' model"):
        vitkit.checkpoints.export(model, tmp_path / "m.npz", "official")
    timm_file = tmp_path / "timm.pth"
    vitkit.checkpoints.export(create_model("vit_micro"), timm_file, "timm")
    with pytest.raises(CheckpointError, match="model= gives a 'tiny' model"):
        read_checkpoint(timm_file, tiny)


# ---------------------------------------------------------------------------------- the CLI


# slow: counts the FLOPs of every registered model; each model is swept in test_registry_sweep
@pytest.mark.slow
def test_models_cli_lists_every_architecture(tiny: str, capsys) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "model",
        "architecture",
        "parameters",
        "GFLOPs",
        "input",
        "width",
        "depth",
        "patch",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    params = 6 * 1 * 9 + 6 + 6 * 10 + 10  # conv weights and biases, head weights and biases
    # FLOPs: the 3x3 convolution at each of the 64 pixels and the head (2 per multiply-add)
    gflops = (2 * 64 * 6 * 9 + 2 * 6 * 10) / 1e9
    assert rows[tiny] == [tiny, "tiny", str(params), f"{gflops:.4f}", "8x8", "-", "-", "-"]
    assert rows["vit_b16"][1:3] == ["vit", "86,567,656"]
    assert rows["vit_b16"][5:] == ["768", "12", "16x16"]


def test_inspect_and_convert_another_architecture(tiny: str, tmp_path: Path, capsys) -> None:
    src = vitkit.save_pretrained(create_model(tiny), tmp_path / "m.safetensors")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "tiny: image 8x8, 1 channels, 10 classes" in out and "weights fit:  yes" in out
    assert main(["convert", str(src), str(tmp_path / "c"), "--to", "vitkit"]) == 0
    assert isinstance(vitkit.from_pretrained(tmp_path / "c"), TinyConvNet)
    assert main(["convert", str(src), str(tmp_path / "h"), "--to", "hf"]) == 2
    assert "holds vit models" in capsys.readouterr().err


def test_eval_and_predict_another_architecture(tiny: str, tmp_path: Path, capsys) -> None:
    """The zero-initialised head gives every class the same logit: argmax is class 0, the
    loss is ln 10 and every probability 0.1, whatever the convolution computes."""
    path = vitkit.save_pretrained(randomised(create_model(tiny)), tmp_path / "m.safetensors")
    with torch.no_grad():
        model = load_pretrained(path)
        model.head.weight.zero_()
        model.head.bias.zero_()
    vitkit.save_pretrained(model, path)
    test = load_dataset("digits", "test")
    zeros = int((test.labels == 0).sum())
    assert main(["eval", str(path), "--data", "digits"]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {zeros / len(test):.4f} ({zeros}/{len(test)})" in out
    assert f"loss {math.log(10):.4f}" in out

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "x.png")
    assert main(["predict", str(path), str(tmp_path / "x.png"), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'x.png'}: ")
    assert [p.split()[1] for p in line.split(": ")[1].split(", ")] == ["0.100", "0.100"]


def test_analysis_of_a_model_without_attention(tiny: str, tmp_path: Path) -> None:
    model = create_model(tiny)
    with pytest.raises(NotApplicable, match="model TinyConvNet has no attention"):
        collect_attentions(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(NotApplicable, match="model TinyConvNet has no position embedding"):
        position_embedding_similarity(model)
    path = vitkit.save_pretrained(model, tmp_path / "m.safetensors")
    assert main(["analyze", str(path), "--data", "digits", "--out", str(tmp_path / "a")]) == 0
    html = (tmp_path / "a" / "report.html").read_text()
    assert html.count("Not shown: model TinyConvNet has no attention.") == 3
    assert "Not shown: model TinyConvNet has no position embedding." in html
    assert "Not shown: model TinyConvNet has no patch embedding." in html
    assert "<th>architecture</th><td>tiny</td>" in html
