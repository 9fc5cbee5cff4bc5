"""Format-independent checkpoint loading.

Each format is a ``CheckpointFormat``: it recognises a path and reads it into a
``Checkpoint`` (the config of a registered architecture and a state dict in vitkit's own
layout). ``build_model`` then builds the model, loads the weights strictly and applies the
fine-tuning overrides, so every format gets the same checks and the same overrides. Which
formats exist, and the order they are tried in, is ``vitkit.checkpoints.formats.FORMATS``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from vitkit.models.pretrained import PretrainedModel, Resizable
from vitkit.models.registry import architecture_of, list_models, model_config


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class Checkpoint:
    config: Any  # the config of a registered architecture
    state_dict: dict[str, torch.Tensor]
    format: str
    dropped: list[str] = field(default_factory=list)  # stored keys that are not model weights


ModelSpec = str | Any | None  # a registered model's name, a config, or nothing
# The img_size a caller of load_pretrained asked for. Formats that record no image size take it
# for a position embedding whose patch count is no square grid, when the counts match.
IMG_SIZE_HINT: ContextVar[int | tuple[int, int] | None] = ContextVar("img_size", default=None)


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, ModelSpec], Checkpoint]


def resolve_spec(spec: ModelSpec) -> Any:
    """A registered model name or a config (of any registered architecture), as a config."""
    if isinstance(spec, str):
        return model_config(spec)
    if spec is not None:
        architecture_of(spec)  # refuse what is not the config of a registered architecture
    return spec


# The config fields that fix a model's weight shapes, of any architecture (ViT, its hybrid,
# ResNet-v2): a checkpoint and a named model disagreeing on one hold different models. The image
# size, the classes and the head's representation layer are not among them: a named model is
# fine-tuned to other values of those.
SHAPE_FIELDS = (
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "patch_size",
    "resnet_layers",
    "resnet_width_factor",
    "layers",
    "width_factor",
    "stem",
)


def shape_of(config: Any) -> dict[str, Any]:
    names = {f.name for f in fields(config)}
    return {name: getattr(config, name) for name in SHAPE_FIELDS if name in names}


def sized_like(config: Any) -> str:
    """The registered model whose shape ``config`` has (``"a vit_ti16-sized model"``), or
    its architecture's name."""
    shape = shape_of(config)
    for name in list_models(architecture_of(config).name):
        if shape_of(model_config(name)) == shape:
            return f"a {name}-sized model"
    return f"a {architecture_of(config).name} model"


def check_named_model(path: Path, name: str, config: Any) -> None:
    """Refuse a registered model name that describes another model than the one the
    checkpoint at ``path`` holds (its ``config``, recorded or read off the weights): the
    name would be ignored, and the user would run a model they did not ask for."""
    named = model_config(name)
    if architecture_of(named) is not architecture_of(config):
        raise CheckpointError(
            f"{path.name} holds {sized_like(config)} but --model says {name} (a "
            f"{architecture_of(named).name}); drop --model or give the matching checkpoint"
        )
    held, wanted = shape_of(config), shape_of(named)
    differing = [key for key in held if held[key] != wanted[key]]
    if differing:

        def show(shape: dict[str, Any]) -> str:
            return ", ".join(f"{key} {shape[key]}" for key in differing)

        raise CheckpointError(
            f"{path.name} holds {sized_like(config)} ({show(held)}) but --model says {name} "
            f"({show(wanted)}); drop --model or give the matching checkpoint"
        )


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise one error naming every missing, unexpected or mis-shaped key, or return."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + ", ".join(problems))


def build_model(ckpt: Checkpoint, **overrides: Any) -> PretrainedModel:
    """Build the checkpoint's model, load its weights, then apply the overrides.

    ``img_size`` resizes a ViT's position embeddings the way the official fine-tuning code
    does (a model without ``set_img_size`` has no weights that depend on it: it is built at
    that size); ``num_classes`` puts a fresh zero-initialised head; anything else (``gelu``,
    ``eps``, dropout rates, ``attn_impl``, ...) replaces the stored config before the weights
    load.
    """
    img_size = overrides.pop("img_size", None)
    num_classes = overrides.pop("num_classes", None)
    try:
        config = ckpt.config.replace(**overrides)
        model = architecture_of(config).build(config)
        if img_size is not None and not isinstance(model, Resizable):
            config = config.replace(img_size=img_size)
            model, img_size = architecture_of(config).build(config), None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid override: {err}") from None
    check_state_dict(model, ckpt.state_dict)
    model.load_state_dict(ckpt.state_dict, strict=True)
    if img_size is not None:
        assert isinstance(model, Resizable)  # else it was built at that size above
        model.set_img_size(img_size)
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()
