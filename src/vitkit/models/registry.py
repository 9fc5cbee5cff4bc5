"""The registry: architectures (a config class and a builder) and named models of each.

An architecture is what a checkpoint records (``"architecture"`` in vitkit's config.json and
safetensors metadata) so that it can be rebuilt; a named model is a set of config values for
one architecture. Configs are looked up by their type, so each architecture has its own
config class: a dataclass with ``to_dict()``, ``from_dict()`` and ``replace()`` (``ConfigMixin``
gives all three) and at least the fields ``img_size``, ``in_chans``, ``num_classes`` and
``extra``. A subclass of a registered config class belongs to the same architecture unless it
registers one of its own.

Every lookup first makes sure that the built-in models (``vitkit.models.zoo``) and the plugins
(``vitkit.utils.plugins``) are registered, so the answer does not depend on what was imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitkit.utils.plugins import ensure_loaded

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
class Description:
    """A model config as people read it, for ``vitkit inspect`` (``summary``, ``numerics``),
    ``vitkit models`` (``columns``: ``width``, ``depth``, ``patch``; a missing one shows as
    '-') and the analysis report's model section (``rows``, shown after the input size)."""

    summary: str
    numerics: str = "-"
    columns: dict[str, str] = field(default_factory=dict)
    rows: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Architecture:
    name: str  # "vit", "resnetv2", ...; recorded with every checkpoint vitkit writes
    config_class: type[Any]  # an ArchitectureConfig; each class has its own fields
    build: Callable[[Any], PretrainedModel]  # config -> model

    def describe(self, config: Any) -> Description:
        """``config`` in words: its own ``description()`` where the config class has one (a
        subclass inherits its parent's), else what every model config has."""
        describe_itself = getattr(config, "description", None)
        if callable(describe_itself):
            return cast(Description, describe_itself())
        classes = f"{config.num_classes} classes" if config.num_classes else "no head"
        return Description(
            f"{self.name}: image {config.img_size[0]}x{config.img_size[1]}, "
            f"{config.in_chans} channels, {classes}"
        )


BUILTIN_MODULES = ("vitkit.models.zoo",)  # where the built-in architectures register
_ARCHITECTURES: dict[str, Architecture] = {}
_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (architecture, config values)


def _registered() -> dict[str, Architecture]:
    """The architectures, after the built-ins and the plugins have registered theirs."""
    ensure_loaded(*BUILTIN_MODULES)
    return _ARCHITECTURES


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
    architectures = _registered()
    if name not in architectures:
        raise ValueError(
            f"unknown architecture {name!r}; registered architectures: "
            f"{', '.join(sorted(architectures))}"
        )
    return architectures[name]


def list_architectures() -> list[str]:
    return sorted(_registered())


def register(name: str, architecture: str = "vit", **config: Any) -> None:
    """Register a named model of ``architecture`` with these config values (checked now)."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    if architecture not in _ARCHITECTURES:
        ensure_loaded(*BUILTIN_MODULES, plugins=False)  # no plugins: one may be registering
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r} of model {name!r}; registered "
            f"architectures: {', '.join(sorted(_ARCHITECTURES))} (register it before its models)"
        )
    _ARCHITECTURES[architecture].config_class(**config)  # fail at import, not at first use
    _MODELS[name] = (architecture, config)


def list_models(architecture: str | None = None) -> list[str]:
    """Names of every registered model (of one architecture, if given), sorted."""
    _registered()
    return sorted(m for m, (a, _) in _MODELS.items() if architecture in (None, a))


def model_config(name: str, **overrides: Any) -> Any:
    """The config of a registered model, with ``overrides`` applied."""
    _registered()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    architecture, config = _MODELS[name]
    return get_architecture(architecture).config_class(**{**config, **overrides})


def architecture_of(config_or_model: Any) -> Architecture:
    """The architecture of a config, or of a model (by its ``cfg``): the one registered with
    the config's class or else with its nearest base class (in method resolution order), so
    that a config subclass without an architecture of its own builds its parent's model."""
    config = config_or_model.cfg if isinstance(config_or_model, nn.Module) else config_or_model
    by_class = {arch.config_class: arch for arch in _registered().values()}
    for cls in type(config).__mro__:
        if cls in by_class:
            return by_class[cls]
    raise ValueError(
        f"{type(config).__name__} is not the config of a registered architecture "
        f"({', '.join(sorted(_ARCHITECTURES))})"
    )


def flops_per_image(config: Any, training: bool = False) -> float:
    """Forward FLOPs of one image (2 per multiply-add), counted by PyTorch on the meta device:
    of inference, or with ``training`` of a training step's forward pass, which patch dropout
    makes cheaper."""
    with torch.device("meta"):
        model = architecture_of(config).build(config).train(training)
        x = torch.empty(1, config.in_chans, *config.img_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def create_model(name: str, **overrides: Any) -> PretrainedModel:
    """Build a registered model, e.g. ``create_model("vit_b16", num_classes=10, img_size=384)``."""
    config = model_config(name, **overrides)
    return architecture_of(config).build(config)


__all__ = [
    "BUILTIN_MODULES",
    "Architecture",
    "ArchitectureConfig",
    "Description",
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
