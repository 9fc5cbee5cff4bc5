"""The registry: architectures (a config class and a builder) and named models of each.

An architecture is what a checkpoint records (``"architecture"`` in vitkit's config.json and
safetensors metadata) so that it can be rebuilt; a named model is a set of config values for
one architecture. Configs are looked up by their type, so each architecture has its own
config class: a dataclass with ``to_dict()``, ``from_dict()`` and ``replace()`` and at least
the fields ``img_size``, ``in_chans``, ``num_classes`` and ``extra``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from vitkit.models.pretrained import PretrainedModel


class ModelConfig(Protocol):
    """What code may read from any model's ``cfg``, a deployed model's
    (``vitkit.deploy``) included: the input it takes and the classes it names."""

    @property
    def img_size(self) -> tuple[int, int]: ...
    @property
    def in_chans(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def extra(self) -> dict[str, Any]: ...


class ArchitectureConfig(ModelConfig, Protocol):
    """The config of a registered architecture (this module's docstring)."""

    def to_dict(self) -> dict[str, Any]: ...
    def replace(self, **overrides: Any) -> Self: ...


@dataclass(frozen=True)
class Architecture:
    name: str  # "vit", "resnetv2", ...; recorded with every checkpoint vitkit writes
    config_class: type[Any]  # an ArchitectureConfig; each class has its own fields
    build: Callable[[Any], PretrainedModel]  # config -> model


_ARCHITECTURES: dict[str, Architecture] = {}
_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (architecture, config values)


def register_architecture(arch: Architecture) -> None:
    if arch.name in _ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    for other in _ARCHITECTURES.values():
        if other.config_class is arch.config_class:
            raise ValueError(
                f"architectures {other.name!r} and {arch.name!r} share the config class "
                f"{arch.config_class.__name__}: each needs its own, configs name their architecture"
            )
    _ARCHITECTURES[arch.name] = arch


def unregister_architecture(name: str) -> None:
    """Remove an architecture and its named models (for tests that register their own)."""
    get_architecture(name)
    del _ARCHITECTURES[name]
    for model in [m for m, (a, _) in _MODELS.items() if a == name]:
        del _MODELS[model]


def get_architecture(name: str) -> Architecture:
    if name not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; registered architectures: "
            f"{', '.join(sorted(_ARCHITECTURES))}"
        )
    return _ARCHITECTURES[name]


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def register(name: str, architecture: str = "vit", **config: Any) -> None:
    """Register a named model of ``architecture`` with these config values (checked now)."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    get_architecture(architecture).config_class(**config)  # fail at import, not at first use
    _MODELS[name] = (architecture, config)


def list_models(architecture: str | None = None) -> list[str]:
    """Names of every registered model (of one architecture, if given), sorted."""
    return sorted(m for m, (a, _) in _MODELS.items() if architecture in (None, a))


def model_config(name: str, **overrides: Any) -> Any:
    """The config of a registered model, with ``overrides`` applied."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    architecture, config = _MODELS[name]
    return get_architecture(architecture).config_class(**{**config, **overrides})


def architecture_of(config_or_model: Any) -> Architecture:
    """The architecture of a config, or of a model (by its ``cfg``)."""
    config = config_or_model.cfg if isinstance(config_or_model, nn.Module) else config_or_model
    for arch in _ARCHITECTURES.values():
        if type(config) is arch.config_class:
            return arch
    raise ValueError(
        f"{type(config).__name__} is not the config of a registered architecture "
        f"({', '.join(sorted(_ARCHITECTURES))})"
    )


def flops_per_image(config: Any) -> float:
    """Forward FLOPs of one image (2 per multiply-add), counted by PyTorch on the meta device."""
    with torch.device("meta"):
        model = architecture_of(config).build(config)
        x = torch.empty(1, config.in_chans, *config.img_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def create_model(name: str, **overrides: Any) -> PretrainedModel:
    """Build a registered model, e.g. ``create_model("vit_b16", num_classes=10, img_size=384)``."""
    config = model_config(name, **overrides)
    return architecture_of(config).build(config)


__all__ = [
    "Architecture",
    "ArchitectureConfig",
    "ModelConfig",
    "architecture_of",
    "create_model",
    "flops_per_image",
    "get_architecture",
    "list_architectures",
    "list_models",
    "model_config",
    "register",
    "register_architecture",
    "unregister_architecture",
]
