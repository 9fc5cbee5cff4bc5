"""Format-independent checkpoint loading.

Each format is a ``CheckpointFormat``: it recognises a path and reads it into a
``Checkpoint`` (the architecture it implies and a state dict in vitkit's own layout).
``load_pretrained`` then builds the model, loads the weights strictly and applies the
fine-tuning overrides, so every format gets the same checks and the same overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitkit.models.registry import model_config
from vitkit.models.vit import VisionTransformer, ViTConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class Checkpoint:
    config: ViTConfig
    state_dict: dict[str, torch.Tensor]
    format: str
    dropped: list[str] = field(default_factory=list)  # stored keys that are not model weights


ModelSpec = str | ViTConfig | None
# The img_size a caller of load_pretrained asked for. Formats that record no image size take it
# for a position embedding whose patch count is no square grid, when the counts match.
IMG_SIZE_HINT: ContextVar[int | tuple[int, int] | None] = ContextVar("img_size", default=None)


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, ModelSpec], Checkpoint]


FORMATS: list[CheckpointFormat] = []


def register_format(fmt: CheckpointFormat) -> None:
    FORMATS.append(fmt)


def resolve_spec(spec: ModelSpec) -> ViTConfig | None:
    """A registered model name or a config, as a config."""
    if spec is None or isinstance(spec, ViTConfig):
        return spec
    return model_config(spec)


def read_checkpoint(path: str | Path, model: ModelSpec = None) -> Checkpoint:
    """Recognise the format of ``path`` and read it, without building a model."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt.read(path, model)
    names = ", ".join(f.name for f in FORMATS)
    raise CheckpointError(f"{path} is not a checkpoint format vitkit knows ({names})")


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


def build_model(ckpt: Checkpoint, **overrides: Any) -> VisionTransformer:
    """Build the checkpoint's model, load its weights, then apply the overrides.

    ``img_size`` resizes the position embeddings the way the official fine-tuning code does;
    ``num_classes`` puts a fresh zero-initialised head; anything else (``gelu``, ``eps``,
    dropout rates, ``attn_impl``, ...) replaces the stored config before the weights load.
    """
    img_size = overrides.pop("img_size", None)
    num_classes = overrides.pop("num_classes", None)
    try:
        config = ckpt.config.replace(**overrides)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid override: {err}") from None
    model = VisionTransformer(config)
    check_state_dict(model, ckpt.state_dict)
    model.load_state_dict(ckpt.state_dict, strict=True)
    if img_size is not None:
        model.set_img_size(img_size)
    if num_classes is not None and num_classes != config.num_classes:
        model.reset_classifier(num_classes)
    return model.eval()


def load_pretrained(
    path: str | Path, model: ModelSpec = None, **overrides: Any
) -> VisionTransformer:
    """Load any checkpoint vitkit reads into a ``VisionTransformer``.

    ``model`` names a registered model or passes a ``ViTConfig``, for formats that do not
    record the whole architecture. See ``build_model`` for the overrides.
    """
    token = IMG_SIZE_HINT.set(overrides.get("img_size"))
    try:
        ckpt = read_checkpoint(path, model)
    finally:
        IMG_SIZE_HINT.reset(token)
    return build_model(ckpt, **overrides)
