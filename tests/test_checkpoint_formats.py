"""Reading the published checkpoint layouts, each checked against another implementation.

- Hugging Face: random-weight models built and saved by ``transformers`` itself;
- big_vision and timm: derived from the official fixtures (whose logits come from the official
  JAX code) by the published conversions, written out here independently of vitkit's rules:
  big_vision's ``fix_old_checkpoints`` renaming and timm's ``_load_weights``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

import vitkit
from tests.test_official import fixture_dir, load_io
from vitkit import ViTConfig
from vitkit.checkpoints import read_checkpoint
from vitkit.models.posembed import sincos_2d

HF_CONFIGS = {
    # transformers' defaults: exact GELU, eps 1e-12
    "exact_gelu": dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    ),
    # the official numerics, another patch and image size, no qkv bias
    "tanh_gelu": dict(
        image_size=24,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=3,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        qkv_bias=False,
    ),
}


def official_arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir(name) / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def transformers():  # an optional test dependency
    return pytest.importorskip("transformers")


# ------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hugging_face_classifier_logits(name: str, tmp_path: Path, transformers) -> None:
    torch.manual_seed(1)
    hf_cfg = transformers.ViTConfig(**HF_CONFIGS[name])
    reference = transformers.ViTForImageClassification(hf_cfg).eval()
    reference.save_pretrained(tmp_path)
    model = vitkit.load_pretrained(tmp_path)
    assert (model.cfg.eps, model.cfg.gelu) == (
        hf_cfg.layer_norm_eps,
        "none" if hf_cfg.hidden_act == "gelu" else "tanh",
    )
    size = hf_cfg.image_size
    x = torch.rand(3, 3, size, size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4, rtol=0)


def test_hugging_face_vit_model_pooler_is_the_representation(tmp_path: Path, transformers) -> None:
    torch.manual_seed(2)
    hf_cfg = transformers.ViTConfig(**HF_CONFIGS["exact_gelu"], pooler_output_size=24)
    reference = transformers.ViTModel(hf_cfg).eval()
    reference.save_pretrained(tmp_path)
    model = vitkit.load_pretrained(tmp_path)
    assert (model.cfg.num_classes, model.cfg.representation_size) == (0, 24)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out = reference(x)
        torch.testing.assert_close(model(x), out.pooler_output, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            model.forward_features(x), out.last_hidden_state, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("storage", ["pytorch_model.bin", "two shards"])
def test_hugging_face_other_weight_files(storage: str, tmp_path: Path, transformers) -> None:
    torch.manual_seed(3)
    reference = transformers.ViTForImageClassification(
        transformers.ViTConfig(**HF_CONFIGS["exact_gelu"])
    ).eval()
    reference.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    if storage == "pytorch_model.bin":
        torch.save(weights, tmp_path / storage)
    else:  # what save_pretrained writes for models above its shard size
        keys = sorted(weights)
        shards = {
            "model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2],
        }
        for shard, shard_keys in shards.items():
            save_file({k: weights[k].contiguous() for k in shard_keys}, str(tmp_path / shard))
        index = {"weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            vitkit.load_pretrained(tmp_path)(x), reference(x).logits, atol=1e-4, rtol=0
        )


# ----------------------------------------------------------------- official, big_vision
BIG_VISION_RENAMES = {  # pre-Linen module numbering → Linen's (per module type)
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


def official_to_big_vision(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's documented conversion (``fix_old_checkpoints``), under ``params/``."""
    out = {}
    posemb = a["Transformer/posembed_input/pos_embedding"]
    for key, value in a.items():
        if key == "Transformer/posembed_input/pos_embedding":
            continue
        for old, new in BIG_VISION_RENAMES.items():
            key = key.replace(old, new)
        out[f"params/{key}"] = value
    if "cls" in a:  # fold the [class] slot of the position embedding into the token
        out["params/cls"] = a["cls"] + posemb[:, :1]
        posemb = posemb[:, 1:]
    out["params/pos_embedding"] = posemb
    return out


@pytest.mark.parametrize("name", ["vit_micro_token", "vit_micro_gap_prelogits"])
def test_big_vision_layout_gives_the_official_logits(name: str, tmp_path: Path) -> None:
    path = tmp_path / "bv.npz"
    np.savez(path, **official_to_big_vision(official_arrays(name)))
    ckpt = read_checkpoint(path)
    assert ckpt.format == "big_vision"
    if ckpt.config.classifier == "token":  # big_vision gives the [class] token no position
        assert torch.count_nonzero(ckpt.state_dict["pos_embed.weight"][0, 0]) == 0
    images, expected = load_io(name)
    with torch.no_grad():
        logits = vitkit.load_pretrained(path)(images)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_big_vision_sincos_model_needs_its_size_and_matches(tmp_path: Path) -> None:
    """No stored position embedding → the fixed sin-cos one, the same as storing it."""
    name = "vit_micro_gap_prelogits"  # gap: no [class] token, so no slot to worry about
    a = official_arrays(name)
    fixed = sincos_2d((4, 4), 64)[None].numpy()
    with_fixed = {**a, "Transformer/posembed_input/pos_embedding": fixed}
    np.savez(tmp_path / "official.npz", **with_fixed)
    bv = official_to_big_vision(with_fixed)
    del bv["params/pos_embedding"]
    np.savez(tmp_path / "bv.npz", **bv)
    with pytest.raises(vitkit.CheckpointError, match="model="):
        vitkit.load_pretrained(tmp_path / "bv.npz")
    model = vitkit.load_pretrained(tmp_path / "bv.npz", model=ViTConfig(img_size=32, patch_size=8))
    assert model.cfg.pos_embed == "sincos_2d"
    images, _ = load_io(name)
    with torch.no_grad():
        expected = vitkit.load_pretrained(tmp_path / "official.npz")(images)
        torch.testing.assert_close(model(images), expected, atol=1e-6, rtol=0)


def test_official_training_checkpoint_drops_optimizer_state(tmp_path: Path) -> None:
    name = "vit_micro_token"
    arrays = {f"opt/target/{k}": v for k, v in official_arrays(name).items()}
    arrays["opt/state/step"] = np.array(7)
    np.savez(tmp_path / "train.npz", **arrays)
    ckpt = read_checkpoint(tmp_path / "train.npz")
    assert (ckpt.format, ckpt.dropped) == ("official", ["opt/state/step"])
    images, expected = load_io(name)
    with torch.no_grad():
        logits = vitkit.load_pretrained(tmp_path / "train.npz")(images)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- timm
def official_to_timm(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's ``_load_weights`` for an official ViT ``.npz``, written out."""
    width = a["embedding/bias"].shape[0]
    sd = {
        "patch_embed.proj.weight": a["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": a["embedding/bias"],
        "pos_embed": a["Transformer/posembed_input/pos_embedding"],
        "norm.weight": a["Transformer/encoder_norm/scale"],
        "norm.bias": a["Transformer/encoder_norm/bias"],
        "head.weight": a["head/kernel"].T,
        "head.bias": a["head/bias"],
    }
    if "cls" in a:
        sd["cls_token"] = a["cls"]
    if "pre_logits/kernel" in a:
        sd["pre_logits.fc.weight"] = a["pre_logits/kernel"].T
        sd["pre_logits.fc.bias"] = a["pre_logits/bias"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = src + "MultiHeadDotProductAttention_1/"
        qkv = ("query", "key", "value")
        sd[dst + "norm1.weight"] = a[src + "LayerNorm_0/scale"]
        sd[dst + "norm1.bias"] = a[src + "LayerNorm_0/bias"]
        sd[dst + "attn.qkv.weight"] = np.concatenate(
            [a[f"{att}{n}/kernel"].reshape(width, -1).T for n in qkv]
        )
        sd[dst + "attn.qkv.bias"] = np.concatenate([a[f"{att}{n}/bias"].reshape(-1) for n in qkv])
        sd[dst + "attn.proj.weight"] = a[att + "out/kernel"].reshape(-1, width).T
        sd[dst + "attn.proj.bias"] = a[att + "out/bias"]
        sd[dst + "norm2.weight"] = a[src + "LayerNorm_2/scale"]
        sd[dst + "norm2.bias"] = a[src + "LayerNorm_2/bias"]
        for j in (0, 1):
            sd[dst + f"mlp.fc{j + 1}.weight"] = a[f"{src}MlpBlock_3/Dense_{j}/kernel"].T
            sd[dst + f"mlp.fc{j + 1}.bias"] = a[f"{src}MlpBlock_3/Dense_{j}/bias"]
        i += 1
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def save_timm(sd: dict[str, np.ndarray], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_numpy(sd, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
@pytest.mark.parametrize(
    ("name", "heads"), [("vit_micro_token", 4), ("vit_micro_gap_prelogits", 2)]
)
def test_timm_state_dict_gives_the_official_logits(
    name: str, heads: int, suffix: str, tmp_path: Path
) -> None:
    path = save_timm(official_to_timm(official_arrays(name)), tmp_path / f"timm{suffix}")
    spec = ViTConfig(width=64, num_heads=heads)
    ckpt = read_checkpoint(path, spec)
    assert ckpt.format == "timm"
    assert (ckpt.config.gelu, ckpt.config.eps) == ("none", 1e-6)  # timm's numerics
    images, expected = load_io(name)
    with torch.no_grad():  # the official weights were trained with the tanh GELU
        logits = vitkit.load_pretrained(path, model=spec, gelu="tanh")(images)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_timm_training_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    sd = {
        k: torch.from_numpy(v)
        for k, v in official_to_timm(official_arrays("vit_micro_token")).items()
    }
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    model = vitkit.load_pretrained(tmp_path / "ckpt.pth", model="vit_micro")
    torch.testing.assert_close(model.head.weight, sd["head.weight"], atol=0, rtol=0)
