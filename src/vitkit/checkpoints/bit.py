"""BiT ResNet-v2 checkpoints: the official ``.npz`` files and timm's ``resnetv2_*_bit`` weights.

Two layouts of the same model (``vitkit.models.resnetv2``), each one rule table used both ways:

- google-research/big_transfer's ``.npz`` (BiT-S and BiT-M, as ``bit_pytorch/models.py``
  ``load_from`` reads them): ``resnet/root_block/standardized_conv2d/kernel``, per unit
  ``resnet/block{s}/unit{uu}/{a,b,c}/group_norm/{gamma,beta}`` and
  ``.../{a,b,c}/standardized_conv2d/kernel`` (a, b, c: the 1x1, 3x3 and 1x1 convolutions and
  the pre-activation norm before each), the projection ``.../a/proj/standardized_conv2d/kernel``,
  the final ``resnet/group_norm`` and the head ``resnet/head/conv2d/{kernel,bias}``. Kernels are
  (H, W, C_in, C_out); the head is a 1x1 convolution, (1, 1, C, classes). BiT's code
  standardises weights with eps 1e-10, so that is the config this reader gives.
- timm's state dict: vitkit's parameter names are timm's except the projection
  (timm: ``downsample.conv``) and the head (timm: ``head.fc``, a 1x1 convolution
  (classes, C, 1, 1)). timm standardises with eps 1e-8. timm's BatchNorm ResNet-v2s
  (``resnetv2_50``, ...) are a different model and are refused.

A state dict does not record the image size (a ResNet takes any): it comes from ``model=``,
else 224. Files that vitkit wrote record their whole config, as the ViT formats do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vitkit.checkpoints.core import (
    Checkpoint,
    CheckpointError,
    CheckpointFormat,
    ModelSpec,
    resolve_spec,
)
from vitkit.checkpoints.mapping import (
    CONV,
    IDENTITY,
    Rule,
    Transform,
    count_indexed,
    from_vitkit,
    to_vitkit,
    unused_keys,
)
from vitkit.checkpoints.native import load_tensors, read_metadata
from vitkit.checkpoints.official import CONFIG_ARRAY, npz_names, read_npz, save_npz
from vitkit.checkpoints.timm import (
    EXPORT_CONFIG_KEY,
    RESNETV2_STEM,
    SUFFIXES,
    load_pickle,
    save_state_dict,
    stored_keys,
)
from vitkit.models.resnet import bottleneck_plan, needs_projection
from vitkit.models.resnetv2 import ResNetV2, ResNetV2Config, Stem

BIT_ROOT = "resnet/root_block/standardized_conv2d/kernel"
BIT_WS_EPS = 1e-10  # big_transfer: (w - mean) / sqrt(var + 1e-10)
TIMM_WS_EPS = 1e-8  # timm's resnetv2_*_bit: StdConv2d(eps=1e-8)
STEMS_BY_KERNEL: dict[int, Stem] = {7: "bit", 3: "conv3x3"}

# BiT's head, a 1x1 convolution (1, 1, C, classes) ↔ vitkit's Linear weight (classes, C).
BIT_HEAD = Transform(lambda parts: parts[0].flatten(0, 2).T, lambda t, cfg: [t.T[None, None]])
# timm's head, a 1x1 convolution (classes, C, 1, 1) ↔ (classes, C).
TIMM_HEAD = Transform(lambda parts: parts[0].flatten(1), lambda t, cfg: [t[:, :, None, None]])


def bit_rules(cfg: ResNetV2Config) -> list[Rule]:
    def norm(ours: str, theirs: str) -> list[Rule]:
        return [
            Rule(f"{ours}.weight", (f"{theirs}/gamma",)),
            Rule(f"{ours}.bias", (f"{theirs}/beta",)),
        ]

    rules = [Rule("stem.conv.weight", (BIT_ROOT,), CONV)]
    for s, stage in enumerate(bottleneck_plan(cfg.layers, cfg.width)):
        for u, unit in enumerate(stage):
            src, dst = f"resnet/block{s + 1}/unit{u + 1:02d}", f"stages.{s}.blocks.{u}"
            for i, part in enumerate("abc", start=1):
                rules += norm(f"{dst}.norm{i}", f"{src}/{part}/group_norm")
                kernel = f"{src}/{part}/standardized_conv2d/kernel"
                rules.append(Rule(f"{dst}.conv{i}.weight", (kernel,), CONV))
            if needs_projection(*unit):
                kernel = f"{src}/a/proj/standardized_conv2d/kernel"
                rules.append(Rule(f"{dst}.downsample.weight", (kernel,), CONV))
    rules += norm("norm", "resnet/group_norm")
    if cfg.num_classes:
        rules += [
            Rule("head.weight", ("resnet/head/conv2d/kernel",), BIT_HEAD),
            Rule("head.bias", ("resnet/head/conv2d/bias",)),
        ]
    return rules


def timm_rules(cfg: ResNetV2Config) -> list[Rule]:
    with torch.device("meta"):
        keys = list(ResNetV2(cfg).state_dict())
    rules = []
    for key in keys:
        theirs = key.replace(".downsample.", ".downsample.conv.").replace("head.", "head.fc.")
        rules.append(Rule(key, (theirs,), TIMM_HEAD if key == "head.weight" else IDENTITY))
    return rules


def resnet_spec(spec: ModelSpec) -> ResNetV2Config | None:
    """``model=`` as a ResNet-v2 config, or a clear error when it names another architecture."""
    resolved = spec if isinstance(spec, ResNetV2Config) else resolve_spec(spec)
    if resolved is not None and not isinstance(resolved, ResNetV2Config):
        raise CheckpointError(
            f"model= gives a {type(resolved).__name__}, but the checkpoint holds a BiT ResNet-v2: "
            "name a ResNet-v2 model (e.g. 'resnetv2_50x1') or leave model= out"
        )
    return resolved


def inferred_config(
    stem: torch.Tensor,
    layers: tuple[int, ...],
    num_classes: int,
    ws_eps: float,
    spec: ModelSpec,
    source: Path,
) -> ResNetV2Config:
    """The config that the arrays imply (``stem``: the stem kernel as (C_out, C_in, H, W)).

    The image size, which they do not record, comes from ``spec``.
    """
    width, kernel = int(stem.shape[0]), int(stem.shape[-1])
    try:
        if kernel not in STEMS_BY_KERNEL:
            raise ValueError(f"a {kernel}x{kernel} stem convolution is neither BiT's 7x7 nor 3x3")
        resnet = resnet_spec(spec)
        return ResNetV2Config(
            img_size=resnet.img_size if resnet is not None else (224, 224),
            in_chans=int(stem.shape[1]),
            num_classes=num_classes,
            layers=layers,
            width_factor=width // 64 if width % 64 == 0 else width / 64,
            stem=STEMS_BY_KERNEL[kernel],
            ws_eps=ws_eps,
        )
    except ValueError as err:  # CheckpointError included
        raise CheckpointError(f"{source}: {err}") from None


def stored_config(text: str, source: Path) -> ResNetV2Config:
    try:
        return ResNetV2Config.from_dict(json.loads(text))
    except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{source}: its vitkit config is not a ResNet-v2's ({err})") from None


# --------------------------------------------------------------------------- BiT's .npz
def detect_bit(path: Path) -> bool:
    return path.suffix == ".npz" and path.is_file() and BIT_ROOT in (npz_names(path) or [])


def read_bit(path: Path, spec: ModelSpec) -> Checkpoint:
    """Read a BiT ``.npz``; arrays outside ``resnet/`` are reported as dropped."""
    arrays = read_npz(path)
    a = {
        k: torch.from_numpy(np.asarray(v, np.float32))
        for k, v in arrays.items()
        if v.dtype.kind == "f"
    }
    if CONFIG_ARRAY in arrays:
        cfg = stored_config(str(arrays[CONFIG_ARRAY]), path)
    elif BIT_ROOT not in a:
        raise CheckpointError(f"{path} is not a BiT checkpoint: it has no array {BIT_ROOT}")
    else:
        root = a[BIT_ROOT].permute(3, 2, 0, 1)  # as PyTorch's (C_out, C_in, H, W)
        n_stages = count_indexed(a, "resnet/block{}/", 1)
        head = a.get("resnet/head/conv2d/bias")
        cfg = inferred_config(
            root,
            tuple(
                count_indexed(a, f"resnet/block{s}/unit{{:02d}}/", 1)
                for s in range(1, n_stages + 1)
            ),
            num_classes=0 if head is None else int(head.shape[0]),
            ws_eps=BIT_WS_EPS,
            spec=spec,
            source=path,
        )
    rules = bit_rules(cfg)
    state_dict = to_vitkit(rules, a, f"{path} (BiT layout)")
    leftover = [k for k in unused_keys(rules, arrays) if k != CONFIG_ARRAY]
    unexpected = [k for k in leftover if k.startswith("resnet/")]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected arrays {unexpected} in a BiT ResNet-v2 with config {cfg.to_dict()}"
        )
    return Checkpoint(cfg, state_dict, "bit", dropped=leftover)


def write_bit(model: ResNetV2, path: Path) -> None:
    """Write ``model`` as a BiT-layout ``.npz`` (atomically), with its vitkit config."""
    if path.suffix != ".npz":
        raise CheckpointError(
            f"cannot write BiT's layout: the file name must end in .npz, not {path.name!r}"
        )
    cfg = model.cfg
    save_npz(path, from_vitkit(bit_rules(cfg), model.state_dict(), cfg), cfg.to_dict())


# ------------------------------------------------------------------------- timm's layout
def detect_timm(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES and RESNETV2_STEM in stored_keys(path)


def read_timm(path: Path, spec: ModelSpec) -> Checkpoint:
    """Read timm's ``resnetv2_*_bit`` state dict; a key that no rule reads is an error."""
    metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
    sd = load_tensors(path) if path.suffix == ".safetensors" else load_pickle(path)
    batchnorm = sorted(k for k in sd if k.endswith(".running_mean"))
    if batchnorm:
        raise CheckpointError(
            f"{path} is a timm ResNet-v2 with BatchNorm ({batchnorm[0]}, ...), not BiT's "
            "GroupNorm and weight-standardised model: vitkit reads timm's resnetv2_*_bit only"
        )
    if EXPORT_CONFIG_KEY in metadata:
        cfg = stored_config(metadata[EXPORT_CONFIG_KEY], path)
    elif RESNETV2_STEM not in sd:
        raise CheckpointError(f"{path} is not a timm ResNet-v2: it has no key {RESNETV2_STEM}")
    else:
        stem = sd[RESNETV2_STEM]
        n_stages = count_indexed(sd, "stages.{}.", 0)
        head = sd.get("head.fc.bias")
        cfg = inferred_config(
            stem,
            tuple(count_indexed(sd, f"stages.{s}.blocks.{{}}.", 0) for s in range(n_stages)),
            num_classes=0 if head is None else int(head.shape[0]),
            ws_eps=TIMM_WS_EPS,
            spec=spec,
            source=path,
        )
    rules = timm_rules(cfg)
    unexpected = unused_keys(rules, sd)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {unexpected} in a timm BiT ResNet-v2")
    state_dict = to_vitkit(rules, sd, f"{path} (timm ResNet-v2 layout)")
    return Checkpoint(cfg, state_dict, "timm_resnetv2")


def write_timm(model: ResNetV2, path: Path) -> None:
    """Write ``model`` as timm's ``resnetv2_*_bit`` state dict; the suffix picks the file type."""
    if path.suffix not in SUFFIXES:
        raise CheckpointError(
            f"cannot write timm's layout: the file name must end in one of {SUFFIXES}, "
            f"not {path.name!r}"
        )
    cfg = model.cfg
    save_state_dict(path, from_vitkit(timm_rules(cfg), model.state_dict(), cfg), cfg.to_dict())


BIT_FORMAT = CheckpointFormat("bit", detect_bit, read_bit)
TIMM_FORMAT = CheckpointFormat("timm_resnetv2", detect_timm, read_timm)
