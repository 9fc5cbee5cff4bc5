"""The official ``.npz`` checkpoints of google-research/vision_transformer.

Flax stores Dense kernels as (in, out), convolutions as (H, W, C_in, C_out) and the attention
projections per head: query/key/value (D, heads, head_dim), out (heads, head_dim, D). vitkit
keeps PyTorch's layouts and one fused qkv matrix (3D, D).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
    register_format,
    resolve_spec,
)
from vitkit.models.vit import ViTConfig

TRAINING_PREFIX = "opt/target/"  # checkpoints saved mid-training nest the weights here
ATTN = "MultiHeadDotProductAttention_1"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, refusing pickled objects; a broken file is one clear error."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise CheckpointError(f"{path} is not a readable .npz file ({err})") from None


def strip_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    if any(k.startswith(prefix) for k in arrays):
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    return arrays


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def dense(a: dict[str, np.ndarray], src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"] = _tensor(a[f"{src}/kernel"].T)
    out[f"{dst}.bias"] = _tensor(a[f"{src}/bias"])


def norm(a: dict[str, np.ndarray], src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{dst}.weight"] = _tensor(a[f"{src}/scale"])
    out[f"{dst}.bias"] = _tensor(a[f"{src}/bias"])


def conv(kernel: np.ndarray) -> torch.Tensor:
    return _tensor(kernel.transpose(3, 2, 0, 1))


def count_indexed(arrays: dict[str, np.ndarray], fmt: str, start: int) -> int:
    """How many consecutive ``fmt.format(i)`` prefixes exist, counting from ``start``."""
    n = 0
    while any(k.startswith(fmt.format(start + n) + "/") for k in arrays):
        n += 1
    return n


def infer_config(a: dict[str, np.ndarray], spec: ViTConfig | None) -> ViTConfig:
    """The architecture implied by the arrays (a square grid unless ``spec`` says otherwise)."""
    kernel = a["embedding/kernel"]
    depth = count_indexed(a, "Transformer/encoderblock_{}", 0)
    attn = f"Transformer/encoderblock_0/{ATTN}"
    width, heads = a[f"{attn}/query/kernel"].shape[:2]
    classifier = "token" if "cls" in a else "gap"
    resnet_layers = None
    if "conv_root/kernel" in a:
        n_stages = count_indexed(a, "block{}", 1)
        resnet_layers = tuple(
            count_indexed(a, f"block{s}/unit{{}}", 1) for s in range(1, n_stages + 1)
        )
    num_prefix = 1 if classifier == "token" else 0
    n_patches = a["Transformer/posembed_input/pos_embedding"].shape[1] - num_prefix
    reduction = 1 if resnet_layers is None else 4 * 2 ** (len(resnet_layers) - 1)
    if spec is not None and spec.grid[0] * spec.grid[1] == n_patches:
        img_size = spec.img_size
    else:
        side = round(n_patches**0.5)
        if side * side != n_patches:
            raise CheckpointError(
                f"the position embedding has {n_patches} patches, not a square grid: "
                "pass model=<config with the checkpoint's img_size> to say its shape"
            )
        img_size = (side * kernel.shape[0] * reduction, side * kernel.shape[1] * reduction)
    return ViTConfig(
        img_size=img_size,
        patch_size=kernel.shape[:2],
        in_chans=3 if resnet_layers else kernel.shape[2],
        num_classes=a["head/bias"].shape[0] if "head/bias" in a else 0,
        width=int(width),
        depth=depth,
        num_heads=int(heads),
        mlp_dim=a["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape[1],
        eps=1e-6,
        gelu="tanh",
        classifier=classifier,
        representation_size=a["pre_logits/bias"].shape[0] if "pre_logits/bias" in a else None,
        resnet_layers=resnet_layers,
        resnet_width_factor=a["conv_root/kernel"].shape[-1] / 64 if resnet_layers else 1.0,
    )


def official_to_state_dict(a: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd["patch_embed.proj.weight"] = conv(a["embedding/kernel"])
    sd["patch_embed.proj.bias"] = _tensor(a["embedding/bias"])
    if cfg.resnet_layers is not None:
        sd["patch_embed.backbone.stem.conv.weight"] = conv(a["conv_root/kernel"])
        norm(a, "gn_root", "patch_embed.backbone.stem.norm", sd)
        for s, units in enumerate(cfg.resnet_layers):
            for u in range(units):
                src, dst = f"block{s + 1}/unit{u + 1}", f"patch_embed.backbone.stages.{s}.{u}"
                for name in ("1", "2", "3", "_proj"):
                    if f"{src}/conv{name}/kernel" in a:
                        sd[f"{dst}.conv{name}.weight"] = conv(a[f"{src}/conv{name}/kernel"])
                        norm(a, f"{src}/gn{name}", f"{dst}.gn{name}", sd)
    if cfg.classifier == "token":
        sd["cls_token"] = _tensor(a["cls"])
    sd["pos_embed.weight"] = _tensor(a["Transformer/posembed_input/pos_embedding"])
    for i in range(cfg.depth):
        src, dst = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        norm(a, f"{src}/LayerNorm_0", f"{dst}.norm1", sd)
        norm(a, f"{src}/LayerNorm_2", f"{dst}.norm2", sd)
        qkv = [
            a[f"{src}/{ATTN}/{n}/kernel"].reshape(cfg.width, -1).T
            for n in ("query", "key", "value")
        ]
        sd[f"{dst}.attn.qkv.weight"] = _tensor(np.concatenate(qkv))
        qkv_b = [a[f"{src}/{ATTN}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
        sd[f"{dst}.attn.qkv.bias"] = _tensor(np.concatenate(qkv_b))
        sd[f"{dst}.attn.proj.weight"] = _tensor(
            a[f"{src}/{ATTN}/out/kernel"].reshape(-1, cfg.width).T
        )
        sd[f"{dst}.attn.proj.bias"] = _tensor(a[f"{src}/{ATTN}/out/bias"])
        dense(a, f"{src}/MlpBlock_3/Dense_0", f"{dst}.mlp.fc1", sd)
        dense(a, f"{src}/MlpBlock_3/Dense_1", f"{dst}.mlp.fc2", sd)
    norm(a, "Transformer/encoder_norm", "norm", sd)
    if cfg.representation_size:
        dense(a, "pre_logits", "pre_logits", sd)
    if cfg.num_classes:
        dense(a, "head", "head", sd)
    return sd


def detect(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return True  # an .npz that is not a zip: let read() report it
    return any(
        n in ("embedding/kernel.npy", TRAINING_PREFIX + "embedding/kernel.npy") for n in names
    )


def read(path: Path, spec: ModelSpec) -> Checkpoint:
    arrays = strip_prefix(read_npz(path), TRAINING_PREFIX)
    try:
        cfg = infer_config(arrays, resolve_spec(spec))
        sd = official_to_state_dict(arrays, cfg)
    except KeyError as err:
        raise CheckpointError(f"{path}: official ViT layout is missing the array {err}") from None
    model_prefixes = (
        "embedding/",
        "cls",
        "Transformer/",
        "pre_logits/",
        "head/",
        "conv_root/",
        "gn_root/",
        "block",
    )
    dropped = sorted(k for k in arrays if not k.startswith(model_prefixes))
    return Checkpoint(cfg, sd, "official", dropped=dropped)


register_format(CheckpointFormat("official", detect, read))
