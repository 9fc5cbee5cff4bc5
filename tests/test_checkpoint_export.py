"""Writing every format: read back bit-identically; Hugging Face's also loads in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from tests.test_official import fixture_dir, load_io
from vitkit import VisionTransformer, create_model
from vitkit.checkpoints import export, read_checkpoint
from vitkit.cli import main

MODELS = {
    "token": {},
    "gap_representation": dict(classifier="gap", representation_size=48),
    # exact GELU, another eps, non-square image and patches, no qkv bias
    "exact_nonsquare": dict(
        gelu="none", eps=1e-5, img_size=(32, 48), patch_size=(4, 8), qkv_bias=False
    ),
    "features_only": dict(num_classes=0, representation_size=64),
    # the same with the qkv biases the official layout needs
    "exact_nonsquare_biased": dict(gelu="none", eps=1e-5, img_size=(32, 48), patch_size=(4, 8)),
    "hybrid": dict(resnet_layers=(1, 1), resnet_width_factor=0.5, patch_size=1),
}
TARGETS = {  # format → the path it writes
    "vitkit": "model",
    "vitkit-file": "model.safetensors",
    "timm": "model.safetensors",
    "timm-pth": "model.pth",
    "timm-bin": "model.bin",
    "official": "model.npz",
    "hf": "hf_model",
}
UNSUPPORTED = {  # what each format cannot hold
    ("timm", "hybrid"),
    ("timm-pth", "hybrid"),
    ("timm-bin", "hybrid"),
    ("official", "exact_nonsquare"),  # the official attention always has qkv biases
    ("hf", "gap_representation"),
    ("hf", "hybrid"),
}


def random_model(name: str) -> VisionTransformer:
    """vit_micro with every weight random (the zero-initialised head would hide errors)."""
    torch.manual_seed(3)
    model = create_model("vit_micro", **{"num_classes": 5, **MODELS[name]})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def images(model: VisionTransformer) -> torch.Tensor:
    return torch.rand(2, 3, *model.cfg.img_size) * 2 - 1


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_round_trip_is_bit_identical(target: str, model_name: str, tmp_path: Path) -> None:
    model = random_model(model_name)
    fmt = target.split("-")[0]
    path = tmp_path / TARGETS[target]
    if (target, model_name) in UNSUPPORTED:
        with pytest.raises(vitkit.CheckpointError, match="cannot write"):
            export(model, path, fmt)
        assert not path.exists()
        return
    export(model, path, fmt)
    if path.suffix in (".pth", ".bin"):  # a bare state dict: architecture and numerics given
        cfg = model.cfg
        loaded = vitkit.load_pretrained(path, model=cfg, gelu=cfg.gelu, eps=cfg.eps)
    else:
        loaded = vitkit.load_pretrained(path)
    assert read_checkpoint(path, model.cfg).format == fmt
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def keep_only_weights(path: Path) -> None:
    """Rewrite an ``.npz`` with its float arrays only, as the official code and other Flax tools
    write checkpoints: vitkit's own metadata (the stored config) is gone."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if data[k].dtype.kind == "f"}
    path.unlink()
    np.savez(path, **arrays)


# What a user must supply to read an official .npz that carries no vitkit metadata: the grid
# of a non-square image (the arrays hold only the number of patches) and numerics other than
# the official tanh GELU and eps 1e-6. The rest is read from the arrays' names and shapes.
OFFICIAL_WITHOUT_METADATA = {
    "token": None,
    "gap_representation": None,
    "features_only": None,
    "hybrid": None,
    "exact_nonsquare_biased": dict(gelu="none", eps=1e-5),
}


@pytest.mark.parametrize("model_name", sorted(OFFICIAL_WITHOUT_METADATA))
def test_official_npz_without_vitkit_metadata(model_name: str, tmp_path: Path) -> None:
    model = random_model(model_name)
    path = export(model, tmp_path / "model.npz", "official")
    keep_only_weights(path)
    numerics = OFFICIAL_WITHOUT_METADATA[model_name]
    if numerics is None:
        loaded = vitkit.load_pretrained(path)
    else:
        with pytest.raises(
            vitkit.CheckpointError,
            match="not a square grid, and the format records no image size: pass img_size=",
        ):
            vitkit.load_pretrained(path)
        # The architecture (its image size) does not bring its numerics: the layout implies
        # the official ones unless they are given as overrides.
        assert vitkit.load_pretrained(path, model=model.cfg).cfg.gelu == "tanh"
        loaded = vitkit.load_pretrained(path, model=model.cfg, **numerics)
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    x = images(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_official_npz_holds_exactly_the_official_codes_arrays(tmp_path: Path) -> None:
    """A checkpoint written by the official JAX code, read and written back by vitkit, holds
    the same arrays bit for bit; without vitkit's metadata it still gives the JAX logits."""
    name = "vit_micro_token"
    src = fixture_dir(name) / f"{name}.npz"
    path = export(vitkit.load_pretrained(src), tmp_path / "model.npz", "official")
    keep_only_weights(path)
    with np.load(src) as official, np.load(path) as ours:
        assert sorted(ours.files) == sorted(official.files)
        for key in official.files:
            assert ours[key].dtype == official[key].dtype, key
            np.testing.assert_array_equal(ours[key], official[key], err_msg=key)
    images_nchw, expected = load_io(name)
    with torch.no_grad():
        logits = vitkit.load_pretrained(path)(images_nchw)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name", ["token", "exact_nonsquare", "features_only"])
def test_hugging_face_export_runs_in_transformers(model_name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = random_model(model_name)
    export(model, tmp_path / "hf", "hf")
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        if model.cfg.num_classes:
            hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")
            out = hf.eval()(x).logits
        else:
            out = transformers.ViTModel.from_pretrained(tmp_path / "hf").eval()(x).pooler_output
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


CLASSES = ["cat", "dog", "bird", "fish", "frog"]


def test_class_names_go_to_hugging_face_and_come_back(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = random_model("token")
    model.cfg.extra["classes"] = CLASSES
    export(model, tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "bird", "3": "fish", "4": "frog"}
    assert config["label2id"] == {"cat": 0, "dog": 1, "bird": 2, "fish": 3, "frog": 4}
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")
    assert theirs.config.id2label == dict(enumerate(CLASSES))
    assert vitkit.load_pretrained(tmp_path / "hf").cfg.extra == {"classes": CLASSES}


def test_class_names_written_by_transformers_are_read(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        id2label={0: "left", 1: "right"},
        label2id={"left": 0, "right": 1},
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "theirs")
    model = vitkit.load_pretrained(tmp_path / "theirs")
    assert model.cfg.num_classes == 2 and model.cfg.extra == {"classes": ["left", "right"]}


def test_without_class_names_transformers_placeholders_are_written_not_read(
    tmp_path: Path,
) -> None:
    export(random_model("token"), tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(5)}
    assert vitkit.load_pretrained(tmp_path / "hf").cfg.extra == {}


# ----------------------------------------------------------------------------------- CLI
def test_convert_and_inspect_an_official_checkpoint(tmp_path: Path, capsys) -> None:
    name = "vit_micro_token"
    src = fixture_dir(name) / f"{name}.npz"
    meta = json.loads((fixture_dir(name) / f"{name}.json").read_text())
    images_nchw, expected = load_io(name)
    for fmt, dst in [
        ("timm", "m.safetensors"),
        ("hf", "hf"),
        ("vitkit", "v"),
        ("official", "o.npz"),
    ]:
        assert main(["convert", str(src), str(tmp_path / dst), "--to", fmt]) == 0
        assert main(["inspect", str(tmp_path / dst)]) == 0
        out = capsys.readouterr().out
        assert f"format:       {fmt}" in out
        assert f"parameters:   {meta['n_params']:,}" in out
        assert "GELU tanh approximation, LayerNorm eps 1e-06" in out
        with torch.no_grad():
            logits = vitkit.load_pretrained(tmp_path / dst)(images_nchw)
        torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_convert_applies_overrides(tmp_path: Path) -> None:
    name = "vit_micro_token"
    src = fixture_dir(name) / f"{name}.npz"
    dst = tmp_path / "m"
    args = ["convert", str(src), str(dst), "--to", "vitkit", "--img-size", "48"]
    assert main([*args, "--num-classes", "3", "--gelu", "none"]) == 0
    cfg = vitkit.from_pretrained(dst).cfg
    assert (cfg.img_size, cfg.num_classes, cfg.gelu) == ((48, 48), 3, "none")


def test_inspect_lists_what_loading_drops(tmp_path: Path, capsys) -> None:
    name = "vit_micro_token"
    with np.load(fixture_dir(name) / f"{name}.npz") as data:
        arrays = {f"opt/target/{k}": data[k] for k in data.files}
    np.savez(tmp_path / "train.npz", **arrays, **{"opt/state/step": np.array(7)})
    assert main(["inspect", str(tmp_path / "train.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["dropped"], info["weights fit"]) == (
        "official",
        ["opt/state/step"],
        "yes",
    )
    assert info["config"]["num_heads"] == 4
