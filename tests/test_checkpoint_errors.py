"""Bad input: each case is one clear error naming what is wrong, and nothing is half-written."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit import CheckpointError, create_model
from vitkit.checkpoints import export, hf, official
from vitkit.cli import main


def timm_file(tmp_path: Path, edit=None, name: str = "timm.safetensors") -> Path:
    """vit_micro's weights as a timm state dict, optionally edited first."""
    sd = {k: v.clone() for k, v in create_model("vit_micro").state_dict().items()}
    sd["pos_embed"] = sd.pop("pos_embed.weight")
    if edit:
        edit(sd)
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def broken_vitkit_file(folder: Path) -> Path:
    return truncated(create_model("vit_micro").save_pretrained(folder / "m.safetensors"))


def broken_vitkit_folder(folder: Path) -> Path:
    path = create_model("vit_micro").save_pretrained(folder / "m")
    truncated(path / "model.safetensors")
    return path


def broken_pickle(folder: Path) -> Path:
    return truncated(timm_file(folder, name="m.pth"))


def broken_npz(folder: Path) -> Path:
    return truncated(export(create_model("vit_micro"), folder / "m.npz", "official"))


def npz_that_is_no_zip(folder: Path) -> Path:
    (folder / "m.npz").write_bytes(b"not a zip")
    return folder / "m.npz"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (broken_vitkit_file, "not a readable safetensors file"),
        (broken_vitkit_folder, "not a readable safetensors file"),
        (broken_pickle, "not a readable PyTorch file"),
        (broken_npz, "not a readable .npz file"),
        (npz_that_is_no_zip, "not a readable .npz file"),
    ],
)
def test_truncated_or_corrupt_file(make, message: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=message):
        vitkit.load_pretrained(make(tmp_path), model="vit_micro")


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    sd = dict(create_model("vit_micro").state_dict())
    torch.save({**sd, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        vitkit.load_pretrained(tmp_path / "evil.pth", model="vit_micro")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["notes.txt", "empty_dir", "other.npz"])
def test_unknown_layout(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    if name == "notes.txt":
        path.write_text("hello")
    elif name == "empty_dir":
        path.mkdir()
    else:
        np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a checkpoint format vitkit knows"):
        vitkit.load_pretrained(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        vitkit.load_pretrained(tmp_path / "nope.safetensors")


def test_timm_needs_the_number_of_heads(tmp_path: Path) -> None:
    path = timm_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"number of attention heads: pass model="):
        vitkit.load_pretrained(path)
    with pytest.raises(CheckpointError, match="width 768 but the checkpoint's width is 64"):
        vitkit.load_pretrained(path, model="vit_b16")


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = timm_file(tmp_path, lambda sd: sd.pop("blocks.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]"):
        vitkit.load_pretrained(path, model="vit_micro")


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    path = timm_file(tmp_path, lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks.0.attn.extra'\]"):
        vitkit.load_pretrained(path, model="vit_micro")


def test_unexpected_official_array_is_named(tmp_path: Path) -> None:
    export(create_model("vit_micro"), tmp_path / "m.npz", "official")
    with np.load(tmp_path / "m.npz") as data:
        arrays = {k: data[k] for k in data.files if k != official.CONFIG_ARRAY}
    arrays["Transformer/encoderblock_0/LayerNorm_0/extra"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"LayerNorm_0/extra"):
        vitkit.load_pretrained(tmp_path / "m.npz")


def test_shape_mismatch_names_keys_and_shapes(tmp_path: Path) -> None:
    path = timm_file(tmp_path, lambda sd: sd.update({"head.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"head.bias: checkpoint \(7,\) vs model \(1000,\)"):
        vitkit.load_pretrained(path, model="vit_micro")


def test_hugging_face_config_disagreeing_with_weights(tmp_path: Path) -> None:
    export(create_model("vit_micro"), tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.fc1.weight: checkpoint \(256, 64\)"):
        vitkit.load_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(CheckpointError, match="model_type 'deit'"):
        vitkit.load_pretrained(tmp_path / "hf")


def test_a_hugging_face_vit_hybrid_of_another_bit_is_refused_by_name(tmp_path: Path) -> None:
    """vitkit's hybrid backbone is the post-activation ('bottleneck') BiT of vit-hybrid; a
    pre-activation BiT (BitConfig's default layer_type) would be misread."""
    export(create_model("vit_micro"), tmp_path / "hf", "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    backbone = {"model_type": "bit", "layer_type": "preactivation", "depths": [3, 4, 9]}
    hybrid = {**config, "model_type": "vit-hybrid", "backbone_config": backbone}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hybrid))
    with pytest.raises(CheckpointError, match=r"BiT backbone .* layer_type 'preactivation'"):
        vitkit.load_pretrained(tmp_path / "hf")


@pytest.mark.parametrize(
    ("key", "feature"), [("fc_norm.weight", "fc_norm"), ("blocks.0.ls1.gamma", "layer scale")]
)
def test_timm_extensions_are_refused_by_name(key: str, feature: str, tmp_path: Path) -> None:
    path = timm_file(tmp_path, lambda sd: sd.update({key: torch.ones(64)}))
    with pytest.raises(CheckpointError, match=feature):
        vitkit.load_pretrained(path, model="vit_micro")


def test_big_vision_map_head_is_refused(tmp_path: Path) -> None:
    export(create_model("vit_micro", classifier="gap"), tmp_path / "m.npz", "official")
    with np.load(tmp_path / "m.npz") as data:
        arrays = {f"params/{k}".replace("_1/", "_0/"): data[k] for k in data.files}
    arrays["params/MAPHead_0/probe"] = np.zeros((1, 1, 64), np.float32)
    np.savez(tmp_path / "bv.npz", **arrays)
    with pytest.raises(CheckpointError, match="MAP"):
        vitkit.load_pretrained(tmp_path / "bv.npz")


# ---------------------------------------------------------- nothing half-written by convert
def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def fail_halfway(target: object, *args, **kwargs) -> None:
    """Write part of the output (when handed a file), then fail like a full disk."""
    if hasattr(target, "write"):
        target.write(b"partial")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize(
    ("fmt", "dst", "target"),
    [
        ("hf", "hf_model", (hf, "atomic_write")),  # after model.safetensors, before config.json
        ("official", "m.npz", (np, "savez")),
    ],
)
def test_failed_convert_leaves_nothing_behind(
    fmt: str, dst: str, target: tuple, tmp_path: Path, monkeypatch, capsys
) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(*target, fail_halfway)
    assert main(["convert", str(src), str(out / dst), "--to", fmt]) == 1
    assert capsys.readouterr().err == "vitkit convert: error: disk full (simulated)\n"
    assert entries(out) == []


def test_failed_overwrite_keeps_the_old_destination(tmp_path: Path, monkeypatch) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src")
    dst = tmp_path / "hf_model"
    assert main(["convert", str(src), str(dst), "--to", "hf"]) == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    monkeypatch.setattr(hf, "atomic_write", fail_halfway)
    args = ["convert", str(src), str(dst), "--to", "hf", "--overwrite", "--num-classes", "3"]
    assert main(args) == 1
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert entries(tmp_path) == ["hf_model", "src"]


def test_convert_refuses_to_replace_without_overwrite(tmp_path: Path, capsys) -> None:
    src = create_model("vit_micro").save_pretrained(tmp_path / "src.safetensors")
    (tmp_path / "dst.npz").write_bytes(b"precious")
    assert main(["convert", str(src), str(tmp_path / "dst.npz"), "--to", "official"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "dst.npz").read_bytes() == b"precious"


def test_convert_of_an_unsupported_model_writes_nothing(tmp_path: Path, capsys) -> None:
    src = create_model("vit_micro", classifier="gap").save_pretrained(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "cannot write a Hugging Face ViT" in capsys.readouterr().err
    assert entries(tmp_path) == ["src"]
