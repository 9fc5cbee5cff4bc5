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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitkit.models.pretrained import PretrainedModel, Resizable
from vitkit.models.registry import architecture_of, model_config


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
