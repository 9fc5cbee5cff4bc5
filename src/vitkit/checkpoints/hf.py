"""Hugging Face ``transformers`` ViT folders: ``ViTModel`` and ``ViTForImageClassification``.

A folder holds ``config.json`` (``model_type: "vit"``) and ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``, or ``pytorch_model.bin``). The weights of
``ViTForImageClassification`` sit under ``vit.`` beside its ``classifier``; ``ViTModel``'s
have no prefix and usually a ``pooler`` (Dense + tanh on the [class] token: vitkit's
``pre_logits`` with ``representation_size`` = ``pooler_output_size``). Query, key and value
are separate (D, D) projections; vitkit fuses them. ``hidden_act`` and ``layer_norm_eps``
give the numerics; ``id2label`` / ``label2id`` carry the class names (vitkit's
``cfg.extra["classes"]``) both ways.

Hugging Face's ViT always classifies from the [class] token with a learned 1-D position
embedding and no hybrid stem, and its classifier has no representation layer in front, so
models outside that are refused on writing. A ``ViTModel`` written without a pooler gets a
freshly initialised one when transformers loads it (its ``last_hidden_state`` is exact).

``preprocessor_config.json`` carries the model's evaluation preprocessing
(``EvalPreprocessing``): written as a ``ViTImageProcessor`` for "squash" (resize to
(H, W), bilinear, rescale 1/255, normalise), as a ``ConvNextImageProcessor`` for "crop"
(shortest edge to ``size / crop_pct``, centre crop: timm's crop for a square size under 384
pixels; other crop models get no processor file, with a warning). Read back, a
``ConvNextImageProcessor`` gives "crop", a ``ViTImageProcessor`` "squash" with its mean and
std (one value for every channel); any other folder the default.

Hugging Face's ``vit-hybrid`` (``ViTHybridModel``, converted from timm's
``vit_base_r50_s16_384``; transformers 4.x) is read as vitkit's hybrid: its BiT backbone has
the layout of vitkit's (same 'SAME' padding, post-activation bottlenecks, 32-group GroupNorm,
the stride in the 3x3 convolution) but BiT's numerics: transformers' ``modeling_bit.py``
standardises every convolution by ``sqrt(var + 1e-8)`` and normalises with GroupNorm eps 1e-5
where the official Flax code uses ``std + 1e-5`` and eps 1e-6, so the model is built with
``resnet_numerics="bit"``. The key names follow transformers' ``convert_vit_hybrid_timm_to_pytorch.py``
(``...patch_embeddings.backbone.bit.embedder.{convolution,norm}``,
``...bit.encoder.stages.S.layers.U.{conv,norm}{1,2,3}`` and ``.downsample.{conv,norm}``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
)
from vitkit.checkpoints.mapping import FUSED_QKV, Rule, from_vitkit, read_all_keys
from vitkit.checkpoints.native import load_tensors, save_safetensors
from vitkit.checkpoints.timm import load_pickle
from vitkit.models.preprocessing import RECORD_KEY, EvalPreprocessing
from vitkit.models.vit import GeluKind, VisionTransformer, ViTConfig
from vitkit.utils.files import atomic_write

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
INDEX_FILE, PICKLE_FILE = "model.safetensors.index.json", "pytorch_model.bin"
PROCESSOR_FILE = "preprocessor_config.json"
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers' processors record it
# ConvNextImageProcessor crops (shortest edge to size / crop_pct, centre crop) below this size
# only; from it on it resizes without cropping.
CONVNEXT_CROP_LIMIT = 384
# transformers' ViTConfig defaults, for config files that leave a field out.
DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    pooler_act="tanh",
)
# transformers' BitConfig defaults, and the backbone ViTHybridConfig takes when given none.
BIT_DEFAULTS: dict[str, Any] = dict(
    layer_type="preactivation",
    global_padding=None,
    embedding_dynamic_padding=False,
    num_groups=32,
    hidden_act="relu",
    embedding_size=64,
    depths=[3, 4, 6, 3],
    out_features=None,
)
VIT_HYBRID_BACKBONE: dict[str, Any] = dict(
    global_padding="same",
    layer_type="bottleneck",
    depths=[3, 4, 9],
    out_features=["stage3"],
    embedding_dynamic_padding=True,
)
# hidden_act → vitkit's gelu ("none" = exact erf). gelu_new is the tanh formula written out.
ACTIVATIONS: dict[str, GeluKind] = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
WRITTEN_ACTIVATION = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}


def linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    names = ("weight", "bias") if bias else ("weight",)
    return [Rule(f"{ours}.{n}", (f"{theirs}.{n}",)) for n in names]


def hf_rules(cfg: ViTConfig, prefix: str) -> list[Rule]:
    p = prefix
    rules = [
        *linear("patch_embed.proj", f"{p}embeddings.patch_embeddings.projection"),
        Rule("cls_token", (f"{p}embeddings.cls_token",)),
        Rule("pos_embed.weight", (f"{p}embeddings.position_embeddings",)),
    ]
    for i in range(cfg.depth):
        layer, attn = f"{p}encoder.layer.{i}", f"{p}encoder.layer.{i}.attention.attention"
        qkv_leaves = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        rules += [
            *linear(f"blocks.{i}.norm1", f"{layer}.layernorm_before"),
            *(
                Rule(
                    f"blocks.{i}.attn.qkv.{leaf}",
                    tuple(f"{attn}.{n}.{leaf}" for n in ("query", "key", "value")),
                    FUSED_QKV,
                )
                for leaf in qkv_leaves
            ),
            *linear(f"blocks.{i}.attn.proj", f"{layer}.attention.output.dense"),
            *linear(f"blocks.{i}.norm2", f"{layer}.layernorm_after"),
            *linear(f"blocks.{i}.mlp.fc1", f"{layer}.intermediate.dense"),
            *linear(f"blocks.{i}.mlp.fc2", f"{layer}.output.dense"),
        ]
    rules += linear("norm", f"{p}layernorm")
    if cfg.resnet_layers is not None:
        rules += bit_backbone_rules(
            cfg.resnet_layers, f"{p}embeddings.patch_embeddings.backbone.bit"
        )
    if cfg.representation_size:
        rules += linear("pre_logits", f"{p}pooler.dense")
    if cfg.num_classes:
        rules += linear("head", "classifier")
    return rules


def bit_backbone_rules(layers: tuple[int, ...], bit: str) -> list[Rule]:
    """vit-hybrid's BiT backbone (under ``bit``) onto vitkit's hybrid backbone."""
    ours = "patch_embed.backbone"
    rules = [
        Rule(f"{ours}.stem.conv.weight", (f"{bit}.embedder.convolution.weight",)),
        *linear(f"{ours}.stem.norm", f"{bit}.embedder.norm"),
    ]
    for s, units in enumerate(layers):
        for u in range(units):
            dst, src = f"{ours}.stages.{s}.{u}", f"{bit}.encoder.stages.{s}.layers.{u}"
            for k in ("1", "2", "3"):
                rules.append(Rule(f"{dst}.conv{k}.weight", (f"{src}.conv{k}.weight",)))
                rules += linear(f"{dst}.gn{k}", f"{src}.norm{k}")
            if u == 0:  # the first unit of every stage changes width or stride: a projection
                rules.append(Rule(f"{dst}.conv_proj.weight", (f"{src}.downsample.conv.weight",)))
                rules += linear(f"{dst}.gn_proj", f"{src}.downsample.norm")
    return rules


def hybrid_backbone(hf: dict[str, Any]) -> dict[str, Any]:
    """The ``ViTConfig`` fields of a vit-hybrid's ``backbone_config`` (a ``BitConfig``), or a
    clear error for a BiT that vitkit's hybrid backbone does not compute."""
    bit = {**BIT_DEFAULTS, **(hf.get("backbone_config") or VIT_HYBRID_BACKBONE)}
    problems = []
    if bit["layer_type"] != "bottleneck":
        problems.append(f"layer_type {bit['layer_type']!r} (vitkit: 'bottleneck')")
    if str(bit["global_padding"]).lower() != "same" or not bit["embedding_dynamic_padding"]:
        problems.append("padding other than 'SAME' with dynamic embedding padding")
    if bit["num_groups"] != 32 or bit["hidden_act"] != "relu":
        problems.append(f"{bit['num_groups']} groups / {bit['hidden_act']} (vitkit: 32 / relu)")
    stages = [f"stage{i + 1}" for i in range(len(bit["depths"]))]
    used = [name for name in bit["out_features"] or stages[-1:] if name in stages]
    if len(used) != 1:
        problems.append(f"out_features {bit['out_features']} (vitkit: one stage's output)")
    if problems:
        raise CheckpointError(
            "a vit-hybrid BiT backbone vitkit does not compute: " + "; ".join(problems)
        )
    depth = stages.index(used[0]) + 1
    return dict(
        resnet_layers=tuple(int(d) for d in bit["depths"][:depth]),
        resnet_width_factor=bit["embedding_size"] / 64,
        resnet_numerics="bit",
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable JSON file ({err})") from None


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_FILE).is_file():
        return load_tensors(folder / WEIGHTS_FILE)
    if (folder / INDEX_FILE).is_file():
        shards = sorted(set(read_json(folder / INDEX_FILE).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in load_tensors(folder / shard).items()}
    if (folder / PICKLE_FILE).is_file():
        return load_pickle(folder / PICKLE_FILE)
    raise CheckpointError(
        f"{folder} has a config.json but no weights ({WEIGHTS_FILE}, {INDEX_FILE} or {PICKLE_FILE})"
    )


def config_from_hf(hf: dict[str, Any], sd: dict[str, torch.Tensor], prefix: str) -> ViTConfig:
    hybrid = hf.get("model_type") == "vit-hybrid"
    hf = {**DEFAULTS, **({"patch_size": 1} if hybrid else {}), **hf}
    if hf["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(
            f"hidden_act {hf['hidden_act']!r} is not a GELU vitkit computes; "
            f"supported: {sorted(ACTIVATIONS)}"
        )
    pooler = f"{prefix}pooler.dense.weight"
    has_pooler = pooler in sd and "classifier.weight" not in sd
    if has_pooler and hf["pooler_act"] != "tanh":
        raise CheckpointError(f"pooler_act {hf['pooler_act']!r}: vitkit's representation is tanh")
    num_classes = int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0
    classes = classes_from_hf(hf, num_classes)
    return ViTConfig(
        img_size=hf["image_size"],
        patch_size=hf["patch_size"],
        in_chans=hf["num_channels"],
        num_classes=num_classes,
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        qkv_bias=hf["qkv_bias"],
        eps=hf["layer_norm_eps"],
        gelu=ACTIVATIONS[hf["hidden_act"]],
        classifier="token",
        representation_size=int(sd[pooler].shape[0]) if has_pooler else None,
        extra={"classes": classes} if classes else {},
        **(hybrid_backbone(hf) if hybrid else {}),
    )


def class_names(cfg: ViTConfig) -> list[str]:
    """The model's class names (``cfg.extra["classes"]``), else transformers' ``LABEL_<i>``.

    transformers' ``label2id`` maps each name to one index, so repeated names cannot be
    written; they fall back to ``LABEL_<i>`` too.
    """
    names = cfg.extra.get("classes")
    if (
        isinstance(names, list)
        and len(names) == cfg.num_classes
        and len(set(map(str, names))) == len(names)
    ):
        return [str(n) for n in names]
    return [f"LABEL_{i}" for i in range(cfg.num_classes)]


def classes_from_hf(hf: dict[str, Any], num_classes: int) -> list[str] | None:
    """The class names of ``id2label``, or None when absent, incomplete or transformers'
    placeholders (``LABEL_<i>``), which name nothing."""
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or not num_classes:
        return None
    names = [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)]
    if any(n is None for n in names) or names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return [str(n) for n in names]


def processor_config(cfg: ViTConfig) -> dict[str, Any] | None:
    """The transformers image processor that preprocesses as ``cfg``'s ``EvalPreprocessing``,
    or None where none does (a crop of a non-square or large size)."""
    p = EvalPreprocessing.of(cfg)
    height, width = cfg.img_size
    common = {
        "do_resize": True,
        "resample": BILINEAR,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [p.mean] * cfg.in_chans,
        "image_std": [p.std] * cfg.in_chans,
    }
    if p.resize == "squash":
        return {
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": height, "width": width},
            **common,
        }
    if height == width < CONVNEXT_CROP_LIMIT:
        return {
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": height},
            "crop_pct": p.crop_pct,
            **common,
        }
    return None


def preprocessing_from_hf(folder: Path) -> EvalPreprocessing | None:
    """The crop a ``ConvNextImageProcessor`` in ``folder`` describes, or the squash of a
    ``ViTImageProcessor`` with other statistics than the default; None (the default) for any
    other processor or none."""
    path = folder / PROCESSOR_FILE
    if not path.is_file():
        return None
    processor = read_json(path)
    kind = processor.get("image_processor_type")
    if kind not in ("ConvNextImageProcessor", "ViTImageProcessor"):
        return None
    means, stds = set(processor.get("image_mean", [0.5])), set(processor.get("image_std", [0.5]))
    if len(means) != 1 or len(stds) != 1:
        return None  # per-channel statistics: not a contract vitkit applies
    mean, std = float(means.pop()), float(stds.pop())
    if kind == "ViTImageProcessor":
        squash = EvalPreprocessing(mean=mean, std=std)
        return None if squash == EvalPreprocessing() else squash
    return EvalPreprocessing("crop", float(processor.get("crop_pct", 0.875)), mean=mean, std=std)


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read(path: Path, spec: ModelSpec) -> Checkpoint:
    hf = read_json(path / CONFIG_FILE)
    if hf.get("model_type") not in ("vit", "vit-hybrid"):
        raise CheckpointError(
            f"{path / CONFIG_FILE} has model_type {hf.get('model_type')!r}; vitkit reads "
            "Hugging Face folders of model_type 'vit' (ViTModel, ViTForImageClassification) "
            "and 'vit-hybrid'"
        )
    sd = load_weights(path)
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    try:
        cfg = config_from_hf(hf, sd, prefix)
        preprocessing = preprocessing_from_hf(path)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    if preprocessing is not None:
        cfg = cfg.replace(extra={**cfg.extra, RECORD_KEY: preprocessing.to_dict()})
    return read_all_keys(hf_rules(cfg, prefix), sd, cfg, str(path), "hf", "Hugging Face")


def write(model: VisionTransformer, folder: Path) -> None:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors +
    preprocessor_config.json)."""
    cfg = model.cfg
    problems = []
    if cfg.classifier != "token":
        problems.append("it classifies from the [class] token only (this model uses 'gap')")
    if cfg.pos_embed != "learned":
        problems.append(f"it has the learned 1-D position embedding only, not {cfg.pos_embed!r}")
    if cfg.resnet_layers is not None:
        problems.append("it has no hybrid ResNet stem")
    if cfg.representation_size and cfg.num_classes:
        problems.append(
            "ViTForImageClassification has no representation layer before its classifier "
            "(drop it with num_classes= / reset_classifier first)"
        )
    if problems:
        raise CheckpointError("cannot write a Hugging Face ViT: " + "; ".join(problems))
    classify = cfg.num_classes > 0
    labels = class_names(cfg)
    size = cfg.img_size[0] if cfg.img_size[0] == cfg.img_size[1] else list(cfg.img_size)
    patch = cfg.patch_size[0] if cfg.patch_size[0] == cfg.patch_size[1] else list(cfg.patch_size)
    config = {
        "architectures": ["ViTForImageClassification" if classify else "ViTModel"],
        "model_type": "vit",
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": WRITTEN_ACTIVATION[cfg.gelu],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "layer_norm_eps": cfg.eps,
        "image_size": size,
        "patch_size": patch,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
        "pooler_output_size": cfg.representation_size or cfg.width,
        "pooler_act": "tanh",
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    sd = from_vitkit(hf_rules(cfg, "vit." if classify else ""), model.state_dict(), cfg)
    save_safetensors(folder / WEIGHTS_FILE, sd, {"format": "pt"})
    atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    processor = processor_config(cfg)
    if processor is None:
        logger.warning(
            "%s: no preprocessor_config.json: no transformers image processor takes the centre "
            "crop of a %dx%d model; preprocess as docs/preprocessing.md describes",
            folder,
            *cfg.img_size,
        )
        return
    text = json.dumps(processor, indent=2)
    atomic_write(folder / PROCESSOR_FILE, lambda tmp: tmp.write_text(text))


FORMAT = CheckpointFormat("hf", detect, read)
