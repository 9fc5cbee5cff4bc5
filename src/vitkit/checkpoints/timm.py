"""timm ``VisionTransformer`` state dicts, in ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``.

timm's names are vitkit's, except ``pos_embed`` (vitkit: ``pos_embed.weight``) and the old
representation layer ``pre_logits.fc`` (vitkit: ``pre_logits``); qkv is fused the same way.
timm's ViTs use the exact GELU and LayerNorm eps 1e-6. A state dict does not record the number
of attention heads, so reading one needs ``model=``, unless vitkit wrote it: ``write`` stores
the model's config in the safetensors metadata (``vitkit_export_config``; timm ignores it).
A ``.pth``/``.pt``/``.bin`` file has no such place (a non-tensor entry would break timm's
loading), so it reads back with timm's numerics and without class names: ``write`` says so.

``write`` to a path without one of those suffixes writes timm's hub folder instead (what
``timm.create_model("local-dir:DIR", pretrained=True)`` and ``hf-hub:`` read, as timm's
``push_to_hf_hub`` writes it): ``model.safetensors`` (the state dict above, with the config in
its metadata) and ``config.json`` with ``architecture`` (timm's model name, e.g.
``vit_base_patch16_224``), ``model_args`` (the keyword arguments that make timm's model of
that name this one: sizes, pooling, GELU; only those that differ) and ``pretrained_cfg`` (the
input size, mean, std, interpolation, ``crop_pct`` and ``crop_mode`` of the model's
``EvalPreprocessing``, the number of classes and their names).

Pickle files are loaded with ``torch.load(weights_only=True)``: tensors only, never code.
Not supported, with a message saying so: timm's hybrid (ResNet) naming (read the official
``.npz`` instead), and timm-only extensions such as ``fc_norm``, layer scale or registers.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
)
from vitkit.checkpoints.mapping import (
    Rule,
    count_indexed,
    from_vitkit,
    heads_from_spec,
    img_size_from_patches,
    read_all_keys,
    resolve_vit_spec,
    state_dict_keys,
)
from vitkit.checkpoints.native import load_tensors, read_metadata, save_safetensors
from vitkit.models.preprocessing import RECORD_KEY, EvalPreprocessing
from vitkit.models.vit import ClassifierKind, VisionTransformer, ViTConfig
from vitkit.utils.files import atomic_write

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
EXPORT_CONFIG_KEY = "vitkit_export_config"
# Key fragments of timm features that the paper's ViT does not have.
UNSUPPORTED = {
    "patch_embed.backbone.": "a hybrid ResNet stem in timm's naming (read the official .npz)",
    "fc_norm.": "fc_norm (LayerNorm after average pooling)",
    ".ls1.": "layer scale",
    "reg_token": "register tokens",
    "norm_pre.": "a pre-encoder LayerNorm (CLIP-style)",
    ".q_norm.": "query/key normalisation",
    "attn_pool.": "an attention-pooling head",
}
# timm's ResNet-v2 stem (``resnetv2_*_bit``): such files are BiT ResNets, read by ``bit.py``.
RESNETV2_STEM = "stem.conv.weight"
# Hugging Face's names, to say so when someone passes its weights file instead of its folder.
HF_MARKER = "embeddings.patch_embeddings.projection.weight"
HUB_CONFIG_FILE, HUB_WEIGHTS_FILE = "config.json", "model.safetensors"
# timm's registered ViTs of the paper's sizes: (width, depth, heads) -> the name's size word,
# and for each the (patch, image size) pairs timm registers.
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base"}
TIMM_SIZES |= {(1024, 24, 16): "large", (1280, 32, 16): "huge"}
TIMM_VARIANTS = {
    "tiny": {(16, 224), (16, 384)},
    "small": {(32, 224), (32, 384), (16, 224), (16, 384), (8, 224)},
    "base": {(32, 224), (32, 384), (16, 224), (16, 384), (8, 224)},
    "large": {(32, 224), (32, 384), (16, 224), (16, 384), (14, 224)},
    "huge": {(14, 224)},
}
TIMM_EPS = 1e-6  # the LayerNorm epsilon of timm's ViTs; config.json cannot set another

logger = logging.getLogger(__name__)


def timm_name(key: str) -> str:
    if key == "pos_embed.weight":
        return "pos_embed"
    if key.startswith("pre_logits."):
        return "pre_logits.fc." + key.removeprefix("pre_logits.")
    return key


def timm_rules(cfg: ViTConfig) -> list[Rule]:
    return [Rule(key, (timm_name(key),)) for key in state_dict_keys(cfg)]


def load_pickle(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch pickle file, tensors only (no code is ever run).

    ``mmap`` maps the tensors instead of reading them: cheap when only the keys are needed.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors, and vitkit never runs "
                "pickled code (torch.load weights_only=True refused it); save its state_dict "
                "alone, or as .safetensors, with code you trust"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch file ({err})") from None
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, IndexError) as err:
        # torch.load reports bytes that are not a pickle as a KeyError of the first one
        reason = "neither a zip archive nor a pickle" if isinstance(err, KeyError) else err
        raise CheckpointError(f"{path} is not a readable PyTorch file ({reason})") from None
    # Training scripts wrap the weights: {"model": state_dict, "optimizer": ..., "epoch": ...}.
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def infer_config(
    sd: dict[str, torch.Tensor], spec: ViTConfig | None, num_heads: int | None = None
) -> ViTConfig:
    proj = sd["patch_embed.proj.weight"]
    width, in_chans = int(proj.shape[0]), int(proj.shape[1])
    patch = (int(proj.shape[2]), int(proj.shape[3]))
    classifier: ClassifierKind = "token" if "cls_token" in sd else "gap"
    n_patches = sd["pos_embed"].shape[1] - (classifier == "token")
    return ViTConfig(
        img_size=img_size_from_patches(n_patches, patch, 1, spec),
        patch_size=patch,
        in_chans=in_chans,
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        width=width,
        depth=count_indexed(sd, "blocks.{}.", 0),
        num_heads=num_heads or heads_from_spec(spec, width, "timm", "vit_b16"),
        mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        eps=1e-6,
        gelu="none",
        classifier=classifier,
        representation_size=(
            int(sd["pre_logits.fc.weight"].shape[0]) if "pre_logits.fc.weight" in sd else None
        ),
    )


def stored_keys(path: Path) -> list[str]:
    """The tensor names in a state-dict file without reading the tensors; none if unreadable."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(load_pickle(path, mmap=True))
    except (CheckpointError, SafetensorError, OSError):
        return []


def detect(path: Path) -> bool:
    """Any state-dict file, except timm's ResNet-v2 (BiT), which ``bit.py`` reads."""
    return path.is_file() and path.suffix in SUFFIXES and RESNETV2_STEM not in stored_keys(path)


def read(path: Path, spec: ModelSpec) -> Checkpoint:
    metadata = {}
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        sd = load_tensors(path)
    else:
        sd = load_pickle(path)
    return read_state_dict(path, sd, metadata, resolve_vit_spec(spec))


def read_state_dict(
    path: Path,
    sd: dict[str, torch.Tensor],
    metadata: dict[str, str],
    spec: ViTConfig | None,
    num_heads: int | None = None,
) -> Checkpoint:
    """The checkpoint of the timm state dict ``sd`` read from ``path``; ``num_heads``, when
    known otherwise, spares ``spec``."""
    if any(k.endswith(HF_MARKER) for k in sd):
        raise CheckpointError(
            f"{path} holds Hugging Face ViT weights: pass the folder that holds it and its "
            "config.json instead"
        )
    features = sorted({name for part, name in UNSUPPORTED.items() if any(part in k for k in sd)})
    if features:
        raise CheckpointError(
            f"{path}: this timm model has {', '.join(features)}, which vitkit's ViT does not"
        )
    try:
        if EXPORT_CONFIG_KEY in metadata:  # written by vitkit: the exact config
            cfg = ViTConfig.from_dict(json.loads(metadata[EXPORT_CONFIG_KEY]))
        else:
            cfg = infer_config(sd, spec, num_heads)
    except KeyError as err:
        raise CheckpointError(f"{path}: timm ViT state dict is missing the key {err}") from None
    except (TypeError, ValueError) as err:  # json.JSONDecodeError and CheckpointError included
        raise CheckpointError(f"{path}: {err}") from None
    return read_all_keys(timm_rules(cfg), sd, cfg, str(path), "timm", "timm")


def write(model: VisionTransformer, path: Path) -> None:
    """Write ``model`` as a timm state dict (atomically); the suffix picks the file type.
    A path without one of ``SUFFIXES`` is a folder: timm's hub folder (``write_hub_folder``)."""
    if path.suffix not in SUFFIXES:
        write_hub_folder(model, path)
        return
    cfg = model.cfg
    problems = []
    if cfg.pos_embed != "learned":
        problems.append(f"timm's ViT has the learned 1-D position embedding, not {cfg.pos_embed!r}")
    if cfg.resnet_layers is not None:
        problems.append("vitkit does not write timm's hybrid naming (write the official layout)")
    if problems:
        raise CheckpointError("cannot write a timm state dict: " + "; ".join(problems))
    sd = from_vitkit(timm_rules(cfg), model.state_dict(), cfg)
    save_state_dict(path, sd, cfg.to_dict())
    if path.suffix != ".safetensors":
        lost = config_not_kept(cfg, sd)
        logger.warning(
            "%s records no config: reading it back needs model= (--model) for the number of "
            "heads%s; write .safetensors to keep everything",
            path,
            f" and gives {'; '.join(lost)}" if lost else "",
        )


def save_state_dict(path: Path, sd: dict[str, torch.Tensor], config: dict) -> None:
    """Write a state dict atomically, by suffix; ``.safetensors`` also records vitkit's config."""
    if path.suffix == ".safetensors":
        metadata = {"format": "pt", EXPORT_CONFIG_KEY: json.dumps(config, sort_keys=True)}
        save_safetensors(path, sd, metadata)
    else:
        sd = {k: v.contiguous().clone() for k, v in sd.items()}  # no views of shared storage
        atomic_write(path, lambda tmp: torch.save(sd, tmp))


def config_not_kept(cfg: ViTConfig, sd: dict[str, torch.Tensor]) -> list[str]:
    """How the config read back from the plain state dict ``sd`` differs from ``cfg``."""
    inferred = infer_config(sd, cfg).to_dict()
    return [
        f"no {', '.join(value)} metadata"
        if key == "extra"
        else f"{key} {inferred[key]!r} instead of {value!r}"
        for key, value in cfg.to_dict().items()
        if inferred[key] != value
    ]


def timm_architecture(cfg: ViTConfig) -> tuple[str, dict[str, object]]:
    """timm's model name for ``cfg`` and the ``model_args`` that make that model this one:
    none when timm registers a ViT of exactly these sizes, else the sizes on top of the
    registered name closest in spirit (``vit_base_patch16_224``)."""
    size = TIMM_SIZES.get((cfg.width, cfg.depth, cfg.num_heads))
    patch, height = cfg.patch_size[0], cfg.img_size[0]
    square = cfg.patch_size[0] == cfg.patch_size[1] and cfg.img_size[0] == cfg.img_size[1]
    named = (
        size is not None
        and square
        and (patch, height) in TIMM_VARIANTS[size]
        and cfg.mlp_dim == 4 * cfg.width
        and cfg.in_chans == 3
    )
    name = f"vit_{size}_patch{patch}_{height}" if named else "vit_base_patch16_224"
    args: dict[str, object] = {}
    if not named:
        args |= dict(
            img_size=list(cfg.img_size),
            patch_size=list(cfg.patch_size),
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_dim / cfg.width,
        )
    if not cfg.qkv_bias:
        args["qkv_bias"] = False
    if cfg.classifier == "gap":  # vitkit normalises every token, then averages: no fc_norm
        args |= dict(class_token=False, global_pool="avg", fc_norm=False)
    if cfg.gelu == "tanh":
        args["act_layer"] = "gelu_tanh"
    return name, args


def hub_config(cfg: ViTConfig) -> dict[str, object]:
    """timm's ``config.json`` for ``cfg``, as ``save_config_for_hf`` lays it out."""
    name, model_args = timm_architecture(cfg)
    preprocessing = EvalPreprocessing.of(cfg)
    crop = preprocessing.resize == "crop"
    pretrained_cfg: dict[str, object] = {
        "input_size": [cfg.in_chans, *cfg.img_size],
        "fixed_input_size": not cfg.dynamic_img_size,
        "interpolation": preprocessing.interpolation,
        # "squash" resizes to the input size, then takes all of it (crop_pct 1)
        "crop_pct": preprocessing.crop_pct if crop else 1.0,
        "crop_mode": "center" if crop else "squash",
        "mean": [preprocessing.mean] * cfg.in_chans,
        "std": [preprocessing.std] * cfg.in_chans,
        "num_classes": cfg.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    config: dict[str, object] = {
        "architecture": name,
        "num_classes": cfg.num_classes,
        "num_features": cfg.width,
        "global_pool": "avg" if cfg.classifier == "gap" else "token",
    }
    classes = cfg.extra.get("classes")
    if isinstance(classes, list) and len(classes) == cfg.num_classes and classes:
        config["label_names"] = pretrained_cfg["label_names"] = [str(c) for c in classes]
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    return config


def write_hub_folder(model: VisionTransformer, folder: Path) -> None:
    """Write ``model`` as timm's hub folder: ``model.safetensors`` and ``config.json``."""
    cfg = model.cfg
    if cfg.representation_size and cfg.num_classes:
        raise CheckpointError(
            "cannot write a timm hub folder: timm's ViT has no representation layer before its "
            "head (drop it with num_classes= / reset_classifier first)"
        )
    if cfg.eps != TIMM_EPS:
        logger.warning(
            "%s: timm computes this model with LayerNorm eps %g, not its %g (config.json "
            "cannot set it): outputs will differ slightly",
            folder,
            TIMM_EPS,
            cfg.eps,
        )
    folder.mkdir(parents=True, exist_ok=True)
    write(model, folder / HUB_WEIGHTS_FILE)
    text = json.dumps(hub_config(cfg), indent=2)
    atomic_write(folder / HUB_CONFIG_FILE, lambda tmp: tmp.write_text(text))


FORMAT = CheckpointFormat("timm", detect, read)


# ------------------------------------------------------------------ timm's Hub repositories
# A folder of timm's Hub layout: config.json with the model's ``architecture`` (a timm model
# name such as ``vit_base_patch16_224.augreg2_in21k_ft_in1k``), its ``num_classes``, the class
# names (``label_names``) and ``pretrained_cfg`` (mean, std, crop_pct, input_size), beside
# model.safetensors or pytorch_model.bin. The number of heads, which the weights do not record,
# follows from the model's size in its name (timm's ViTs: vit_base_... has 12).
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TIMM_HEADS = {
    "tiny": 3,
    "small": 6,
    "medium": 8,
    "base": 12,
    "large": 16,
    "huge": 16,
    "giant": 16,
    "gigantic": 16,
}
TIMM_VIT_NAME = re.compile(r"vit_([a-z]+)_patch")


def read_hub_config(path: Path) -> dict | None:
    """timm's config.json in the folder ``path``, or None when it is not a timm Hub folder."""
    config_file = path / "config.json"
    if not (path.is_dir() and config_file.is_file()):
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) and "architecture" in config else None


def detect_hub(path: Path) -> bool:
    return read_hub_config(path) is not None


def read_hub(path: Path, spec: ModelSpec) -> Checkpoint:
    config = read_hub_config(path)
    assert config is not None  # detect_hub said so
    weights = next((path / name for name in HUB_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} is a timm Hub folder without {' or '.join(HUB_WEIGHTS)}")
    vit_spec = resolve_vit_spec(spec)
    size = TIMM_VIT_NAME.match(str(config["architecture"]))
    # model= wins; without it, a model of unknown size needs it (read_state_dict says so)
    # The heads: ``model_args`` (`convert --to timm` writes them for sizes timm has no name
    # for), else the size in the name.
    named_heads = TIMM_HEADS.get(size[1]) if size is not None else None
    given_heads = (config.get("model_args") or {}).get("num_heads", named_heads)
    num_heads = given_heads if vit_spec is None else None
    metadata = read_metadata(weights) if weights.suffix == ".safetensors" else {}
    sd = load_tensors(weights) if weights.suffix == ".safetensors" else load_pickle(weights)
    checkpoint = read_state_dict(weights, sd, metadata, vit_spec, num_heads)
    cfg = checkpoint.config
    extra = dict(cfg.extra)
    pretrained = config.get("pretrained_cfg") or {}
    names = config.get("label_names") or pretrained.get("label_names")
    if isinstance(names, list) and len(names) == cfg.num_classes > 0:
        extra["classes"] = [str(n) for n in names]
    preprocessing = preprocessing_from_timm(path, pretrained)
    if preprocessing is not None:
        extra[RECORD_KEY] = preprocessing.to_dict()
    checkpoint.config = cfg.replace(extra=extra)
    checkpoint.format = "timm-hub"
    return checkpoint


def preprocessing_from_timm(path: Path, pretrained: dict) -> EvalPreprocessing | None:
    """timm's evaluation crop (``crop_pct`` of the shorter side, centre) with its mean and std,
    where they are one value for every channel; None (the default) otherwise, with a warning."""
    means, stds = set(pretrained.get("mean", [0.5])), set(pretrained.get("std", [0.5]))
    if len(means) != 1 or len(stds) != 1:
        logger.warning(
            "%s: per-channel mean %s and std %s are not a preprocessing vitkit applies; "
            "predict and eval use the default (docs/preprocessing.md)",
            path,
            pretrained.get("mean"),
            pretrained.get("std"),
        )
        return None
    mean, std = float(means.pop()), float(stds.pop())
    if pretrained.get("crop_mode") == "squash":  # as `vitkit convert --to timm` writes it
        return EvalPreprocessing("squash", mean=mean, std=std)
    crop_pct = float(pretrained.get("crop_pct", 0.875))
    return EvalPreprocessing("crop", crop_pct, mean=mean, std=std)


HUB_FORMAT = CheckpointFormat("timm-hub", detect_hub, read_hub)
