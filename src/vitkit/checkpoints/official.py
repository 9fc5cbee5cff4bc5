"""The official ``.npz`` checkpoints of google-research/vision_transformer, read and written.

Flax stores Dense kernels as (in, out), convolutions as (H, W, C_in, C_out) and the attention
projections per head: query/key/value (D, heads, head_dim), out (heads, head_dim, D). vitkit
keeps PyTorch's layouts and one fused qkv matrix (3D, D). big_vision's ViT is the same model
under other module names (see ``bigvision.py``), so both share ``FlaxLayout``.

The official layout implies tanh GELU and LayerNorm eps 1e-6. ``write`` also stores the
model's vitkit config as a string array ``vitkit_config``, so a model with other numerics
reads back exactly; the official code ignores that array.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
)
from vitkit.checkpoints.mapping import (
    CONV,
    DENSE,
    IDENTITY,
    WITHOUT_CLASS_SLOT,
    Rule,
    Transform,
    count_indexed,
    from_vitkit,
    img_size_from_patches,
    resolve_vit_spec,
    to_vitkit,
    unused_keys,
)
from vitkit.models.posembed import PosEmbedKind
from vitkit.models.vit import ClassifierKind, VisionTransformer, ViTConfig
from vitkit.utils.files import atomic_write

TRAINING_PREFIX = "opt/target/"  # checkpoints saved mid-training nest the weights here
CONFIG_ARRAY = "vitkit_config"
QKV = ("query", "key", "value")


@dataclass(frozen=True)
class FlaxLayout:
    """Module names of one Flax ViT. Linen numbers modules per type, pre-Linen per scope."""

    name: str
    attention: str
    norm1: str
    norm2: str
    mlp: str
    pos_embedding: str
    pos_has_class_slot: bool
    may_lack_pos_embedding: bool = False  # big_vision's fixed sin-cos embedding stores none


OFFICIAL = FlaxLayout(
    name="official",
    attention="MultiHeadDotProductAttention_1",
    norm1="LayerNorm_0",
    norm2="LayerNorm_2",
    mlp="MlpBlock_3",
    pos_embedding="Transformer/posembed_input/pos_embedding",
    pos_has_class_slot=True,
)


QKV_KERNELS = Transform(  # query/key/value (D, heads, head_dim) each ↔ one fused (3D, D)
    lambda parts: torch.cat([p.reshape(p.shape[0], -1).T for p in parts]),
    lambda weight, cfg: [w.T.reshape(cfg.width, cfg.num_heads, -1) for w in weight.chunk(3)],
)
QKV_BIASES = Transform(  # (heads, head_dim) each ↔ (3D,)
    lambda parts: torch.cat([p.reshape(-1) for p in parts]),
    lambda bias, cfg: [b.reshape(cfg.num_heads, -1) for b in bias.chunk(3)],
)
OUT_KERNEL = Transform(  # (heads, head_dim, D) ↔ (D, D)
    lambda parts: parts[0].reshape(-1, parts[0].shape[-1]).T,
    lambda weight, cfg: [weight.T.reshape(cfg.num_heads, -1, cfg.width)],
)


def dense(ours: str, theirs: str) -> list[Rule]:
    return [
        Rule(f"{ours}.weight", (f"{theirs}/kernel",), DENSE),
        Rule(f"{ours}.bias", (f"{theirs}/bias",)),
    ]


def norm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.weight", (f"{theirs}/scale",)), Rule(f"{ours}.bias", (f"{theirs}/bias",))]


def flax_rules(cfg: ViTConfig, layout: FlaxLayout) -> list[Rule]:
    rules = [
        Rule("patch_embed.proj.weight", ("embedding/kernel",), CONV),
        Rule("patch_embed.proj.bias", ("embedding/bias",)),
    ]
    if cfg.resnet_layers is not None:
        rules += [
            Rule("patch_embed.backbone.stem.conv.weight", ("conv_root/kernel",), CONV),
            *norm("patch_embed.backbone.stem.norm", "gn_root"),
        ]
        for s, units in enumerate(cfg.resnet_layers):
            for u in range(units):
                src, dst = f"block{s + 1}/unit{u + 1}", f"patch_embed.backbone.stages.{s}.{u}"
                # The first unit of every stage changes width or stride: it has a projection.
                for name in ("1", "2", "3", "_proj") if u == 0 else ("1", "2", "3"):
                    rules.append(
                        Rule(f"{dst}.conv{name}.weight", (f"{src}/conv{name}/kernel",), CONV)
                    )
                    rules += norm(f"{dst}.gn{name}", f"{src}/gn{name}")
    if cfg.classifier == "token":
        rules.append(Rule("cls_token", ("cls",)))
    if cfg.pos_embed == "learned":
        slot = (
            IDENTITY if layout.pos_has_class_slot or cfg.classifier == "gap" else WITHOUT_CLASS_SLOT
        )
        rules.append(Rule("pos_embed.weight", (layout.pos_embedding,), slot))
    for i in range(cfg.depth):
        src, dst = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        attn = f"{src}/{layout.attention}"
        rules += [
            *norm(f"{dst}.norm1", f"{src}/{layout.norm1}"),
            Rule(f"{dst}.attn.qkv.weight", tuple(f"{attn}/{n}/kernel" for n in QKV), QKV_KERNELS),
            Rule(f"{dst}.attn.qkv.bias", tuple(f"{attn}/{n}/bias" for n in QKV), QKV_BIASES),
            Rule(f"{dst}.attn.proj.weight", (f"{attn}/out/kernel",), OUT_KERNEL),
            Rule(f"{dst}.attn.proj.bias", (f"{attn}/out/bias",)),
            *norm(f"{dst}.norm2", f"{src}/{layout.norm2}"),
            *dense(f"{dst}.mlp.fc1", f"{src}/{layout.mlp}/Dense_0"),
            *dense(f"{dst}.mlp.fc2", f"{src}/{layout.mlp}/Dense_1"),
        ]
    rules += norm("norm", "Transformer/encoder_norm")
    if cfg.representation_size:
        rules += dense("pre_logits", "pre_logits")
    if cfg.num_classes:
        rules += dense("head", "head")
    return rules


def infer_config(
    a: dict[str, torch.Tensor], layout: FlaxLayout, spec: ViTConfig | None
) -> ViTConfig:
    """The architecture implied by the arrays (a square grid unless ``spec`` says otherwise)."""
    kernel = a["embedding/kernel"]
    attn = f"Transformer/encoderblock_0/{layout.attention}"
    width, heads = a[f"{attn}/query/kernel"].shape[:2]
    classifier: ClassifierKind = "token" if "cls" in a else "gap"
    resnet_layers = None
    if "conv_root/kernel" in a:
        n_stages = count_indexed(a, "block{}/", 1)
        resnet_layers = tuple(
            count_indexed(a, f"block{s}/unit{{}}/", 1) for s in range(1, n_stages + 1)
        )
    patch = (int(kernel.shape[0]), int(kernel.shape[1]))
    if layout.pos_embedding in a or not layout.may_lack_pos_embedding:
        pos_embed: PosEmbedKind = "learned"
        n_slots = a[layout.pos_embedding].shape[1]
        class_slot = classifier == "token" and layout.pos_has_class_slot
        reduction = 1 if resnet_layers is None else 4 * 2 ** (len(resnet_layers) - 1)
        img_size = img_size_from_patches(n_slots - class_slot, patch, reduction, spec)
    elif spec is None:
        raise CheckpointError(
            "this checkpoint has no position embedding array (a fixed sin-cos embedding), so it "
            "does not record its image size: pass model=<registered name or ViTConfig>"
        )
    else:
        pos_embed, img_size = "sincos_2d", spec.img_size
    return ViTConfig(
        img_size=img_size,
        patch_size=patch,
        in_chans=3 if resnet_layers else int(kernel.shape[2]),
        num_classes=int(a["head/bias"].shape[0]) if "head/bias" in a else 0,
        width=int(width),
        depth=count_indexed(a, "Transformer/encoderblock_{}/", 0),
        num_heads=int(heads),
        mlp_dim=int(a[f"Transformer/encoderblock_0/{layout.mlp}/Dense_0/kernel"].shape[1]),
        eps=1e-6,
        gelu="tanh",
        classifier=classifier,
        pos_embed=pos_embed,
        representation_size=int(a["pre_logits/bias"].shape[0]) if "pre_logits/bias" in a else None,
        resnet_layers=resnet_layers,
        resnet_width_factor=a["conv_root/kernel"].shape[-1] / 64 if resnet_layers else 1.0,
    )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, refusing pickled objects; a broken file is one clear error."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        reason = str(err)
        if "allow_pickle" in reason:  # numpy's advice, not passed on: unpickling runs code
            reason = (
                "it is no zip of plain arrays: numpy could only unpickle it, and vitkit never does"
            )
        raise CheckpointError(f"{path} is not a readable .npz file ({reason})") from None


def strip_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drop ``prefix`` from the keys that have it; other keys (optimizer state...) stay."""
    return {k.removeprefix(prefix): v for k, v in arrays.items()}


def npz_names(path: Path) -> list[str] | None:
    """The array names of an ``.npz`` file, without reading the arrays; None if not a zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError):
        return None


def read_flax(
    arrays: dict[str, np.ndarray], layout: FlaxLayout, spec: ModelSpec, source: Path
) -> Checkpoint:
    """Read the arrays of a Flax ViT in ``layout``.

    Arrays outside the model's modules (optimizer state, ...) are reported as dropped; an
    array inside them that no rule reads is an error.
    """
    a = {
        k: torch.from_numpy(np.asarray(v, np.float32))
        for k, v in arrays.items()
        if v.dtype.kind == "f"
    }
    try:
        if CONFIG_ARRAY in arrays:  # written by vitkit: the exact config, numerics included
            cfg = ViTConfig.from_dict(json.loads(str(arrays[CONFIG_ARRAY])))
        else:
            cfg = infer_config(a, layout, resolve_vit_spec(spec))
    except KeyError as err:
        raise CheckpointError(
            f"{source}: {layout.name} ViT layout is missing the array {err}"
        ) from None
    except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{source}: {err}") from None
    rules = flax_rules(cfg, layout)
    state_dict = to_vitkit(rules, a, f"{source} ({layout.name} layout)")
    modules = {k.split("/")[0] for r in rules for k in r.theirs}
    leftover = [k for k in unused_keys(rules, arrays) if k != CONFIG_ARRAY]
    unexpected = [k for k in leftover if k.split("/")[0] in modules]
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected arrays {unexpected} in a {layout.name} ViT with config "
            f"{cfg.to_dict()}"
        )
    return Checkpoint(
        cfg, state_dict, layout.name, dropped=[k for k in leftover if k not in unexpected]
    )


def detect(path: Path) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    names = npz_names(path)
    if names is None:
        return True  # an .npz that is not a zip: let read() report it
    query = f"Transformer/encoderblock_0/{OFFICIAL.attention}/query/kernel"
    return any(n in (query, TRAINING_PREFIX + query) for n in names)


def read(path: Path, spec: ModelSpec) -> Checkpoint:
    return read_flax(strip_prefix(read_npz(path), TRAINING_PREFIX), OFFICIAL, spec, path)


def write(model: VisionTransformer, path: Path) -> None:
    """Write ``model`` as an official-layout ``.npz`` (atomically)."""
    cfg = model.cfg
    problems = []
    if path.suffix != ".npz":
        problems.append(f"the file name must end in .npz, not {path.name!r}")
    if cfg.pos_embed != "learned":
        problems.append(f"it has only the learned 1-D position embedding, not {cfg.pos_embed!r}")
    if not cfg.qkv_bias:
        problems.append("its attention always has query/key/value biases (qkv_bias=False)")
    if cfg.resnet_layers is not None and cfg.resnet_numerics != "official":
        problems.append(
            "its hybrid backbone computes with the official code's epsilons, not BiT's "
            "(this model: resnet_numerics 'bit', from Hugging Face's vit-hybrid)"
        )
    if problems:
        raise CheckpointError("cannot write the official layout: " + "; ".join(problems))
    tensors = from_vitkit(flax_rules(cfg, OFFICIAL), model.state_dict(), cfg)
    save_npz(path, tensors, cfg.to_dict())


def save_npz(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write float32 arrays and vitkit's config (the ``vitkit_config`` array) atomically."""
    arrays = {k: v.float().cpu().numpy() for k, v in tensors.items()}
    arrays[CONFIG_ARRAY] = np.array(json.dumps(config, sort_keys=True))

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)  # plain arrays only, as read_npz

    atomic_write(path, save)


FORMAT = CheckpointFormat("official", detect, read)
