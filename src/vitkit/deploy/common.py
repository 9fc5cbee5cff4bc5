"""What every exported format records about its model, and reads back.

A deployed file keeps the model's config as JSON (``CONFIG_KEY``) so that whatever runs it knows
the input it takes (size, channels, its evaluation preprocessing in ``extra["preprocessing"]``)
and the class names, without the checkpoint it came from. The exported programs take model
inputs: no format embeds the preprocessing itself; ``vitkit eval`` and ``predict`` apply the
recorded one, as for a PyTorch model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from vitkit.models.preprocessing import EvalPreprocessing
from vitkit.models.pretrained import PretrainedModel

CONFIG_KEY = "vitkit_config"


def input_description(model: PretrainedModel) -> str:
    """What the exported program's input is, in words (ONNX's ``vitkit_input``)."""
    return f"float32 NCHW images: {EvalPreprocessing.of(model.cfg).describe()}"


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence warnings from other libraries that say nothing to a vitkit user (the ONNX
    exporter's "torchvision is not installed", deprecation notes about torch internals)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says what to install."""


def import_optional(name: str, install: str) -> ModuleType:
    """Import an optional dependency, or raise ``MissingDependency`` saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependency(f"{install} ({err})") from None


@dataclass(frozen=True)
class DeployedConfig:
    """The part of a model's config that inference needs: ``vitkit eval`` and ``predict``
    resize to ``img_size``, convert to ``in_chans`` channels and name the ``num_classes``
    outputs from ``extra["classes"]``, as they do for a PyTorch model."""

    img_size: tuple[int, int]
    in_chans: int
    num_classes: int
    extra: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)  # the whole config, as stored

    @classmethod
    def from_json(cls, text: str, source: str) -> DeployedConfig:
        try:
            d = json.loads(text)
            return cls(
                img_size=(int(d["img_size"][0]), int(d["img_size"][1])),
                in_chans=int(d["in_chans"]),
                num_classes=int(d["num_classes"]),
                extra=dict(d.get("extra") or {}),
                full=d,
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{source}: its vitkit config is missing or invalid ({err})") from None


def config_json(model: PretrainedModel) -> str:
    return json.dumps(model.cfg.to_dict(), sort_keys=True)


def example_input(model: PretrainedModel, batch: int = 2) -> torch.Tensor:
    """A random input of the model's shape, on its device.

    Batch 2, not 1: ``torch.export`` specialises a dimension traced at size 1 to a constant.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    return torch.rand(batch, cfg.in_chans, *cfg.img_size, device=device) * 2 - 1


def check_input(x: torch.Tensor, cfg: DeployedConfig) -> None:
    """The error a PyTorch model would give, instead of a runtime's shape mismatch message."""
    if x.ndim != 4 or x.shape[1] != cfg.in_chans or tuple(x.shape[-2:]) != cfg.img_size:
        raise ValueError(
            f"expected images of shape (batch, {cfg.in_chans}, {cfg.img_size[0]}, "
            f"{cfg.img_size[1]}), got {tuple(x.shape)}"
        )
