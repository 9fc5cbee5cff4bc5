"""``ConfigMixin``: plain-value round trips for dataclass configs (model and training alike).

A config is a dataclass of plain values; it is saved as JSON, read from TOML and overridden
from flags, so every config class needs the same three operations: ``to_dict`` (plain values:
tuples become lists, nested configs dicts), ``from_dict`` (unknown keys refused by name, nested
configs built from their tables) and ``replace`` (a copy with some values changed, checked like
a new config). They are written once here and build ``type(self)``, so a subclass with extra
fields round-trips as itself rather than as its parent.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Self


class ConfigMixin:
    """Mix into a ``@dataclass`` config. ``config_name`` names it in error messages; with
    ``check_types`` set, ``from_dict`` also checks each value against its field's annotation
    (for configs read from TOML and flags, whose values nothing else has checked)."""

    config_name: ClassVar[str] = ""
    check_types: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Build from plain values (TOML, JSON, flags); nested config fields take a table."""
        return cls(**checked_values(cls, values, ""))

    def replace(self, **overrides: Any) -> Self:
        """A copy with ``overrides``; a nested config's table merges key by key."""
        return type(self).from_dict(merge_tables(type(self), self.to_dict(), overrides))

    @classmethod
    def describe_name(cls) -> str:
        return cls.config_name or cls.__name__

    @classmethod
    def from_table(cls, values: dict[str, Any], prefix: str) -> Self:
        """Build from the table ``values`` found under ``prefix`` in an enclosing config (a
        class with tables beyond its fields, such as registered plugins' options, overrides
        this, ``merge_table`` and ``to_dict``)."""
        return cls(**checked_values(cls, values, prefix))

    @classmethod
    def merge_table(cls, values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        """``values`` (this config's table) with ``overrides`` applied, key by key."""
        return merge_tables(cls, values, overrides)


def plain(value: Any) -> Any:
    """``value`` as JSON-ready plain data: configs as dicts, tuples as lists."""
    if isinstance(value, ConfigMixin):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def nested_config_class(hint: Any) -> type[ConfigMixin] | None:
    """The config class of a field annotated with one (or ``None``)."""
    return hint if isinstance(hint, type) and issubclass(hint, ConfigMixin) else None


def checked_values(cls: type[ConfigMixin], values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` ready for ``cls(**...)``: unknown keys and (with ``check_types``) values of
    the wrong type refused in one message naming each; nested tables built as their configs."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or cls.describe_name()} must be a table")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f" under [{prefix.rstrip('.')}]" if prefix else ""
        raise ValueError(
            f"unknown {cls.describe_name()} keys {[prefix + k for k in unknown]}{where}; "
            f"known keys are {sorted(known)}"
        )
    built: dict[str, Any] = {}
    wrong: list[str] = []
    for name, value in values.items():
        nested = nested_config_class(hints[name])
        if nested is not None and isinstance(value, dict):
            built[name] = nested.from_table(value, f"{prefix}{name}.")
            continue
        if cls.check_types and nested is None and not fits(value, hints[name]):
            wrong.append(f"{prefix}{name} must be {expectation(hints[name])}, not {value!r}")
        built[name] = (
            tuple(value) if isinstance(value, list) and wants_tuple(hints[name]) else value
        )
    if wrong:
        raise ValueError(f"invalid {cls.describe_name()}: " + "; ".join(wrong))
    return built


def wants_tuple(hint: Any) -> bool:
    """Whether a field is annotated as a tuple (or a tuple or None): JSON and TOML give lists,
    which ``from_dict`` turns back into tuples so that a config round-trips equal."""
    return any(typing.get_origin(h) is tuple for h in (hint, *typing.get_args(hint)))


def merge_tables(
    cls: type[ConfigMixin], values: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """``values`` with ``overrides`` applied; the tables of nested configs merge key by key."""
    hints = typing.get_type_hints(cls)
    merged = dict(values)
    for name, value in overrides.items():
        value = plain(value) if isinstance(value, ConfigMixin) else value
        nested = nested_config_class(hints.get(name))
        if nested is not None and isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = nested.merge_table(merged[name], value)
        else:
            merged[name] = value
    return merged


def fits(value: Any, hint: Any) -> bool:
    """Whether a plain value (from TOML, JSON or a flag) fits a field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list | tuple) and all(fits(v, args[0]) for v in value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, list | tuple) and all(fits(v, args[0]) for v in value)
        return (
            isinstance(value, list | tuple)
            and len(value) == len(args)
            and all(fits(v, a) for v, a in zip(value, args, strict=True))
        )
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def expectation(hint: Any) -> str:
    """What a value of the annotation ``hint`` must be, as an error message says it."""
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {typing.get_args(hint)}"
    return describe(hint)


def describe(hint: Any) -> str:
    """An annotation as a person reads it: ``int | none``, ``Literal['adam', 'sgd']``."""
    text = str(hint).replace("typing.", "").replace("NoneType", "none")
    return text.removeprefix("<class '").removesuffix("'>")


def choice_problems(config: Any) -> list[str]:
    """One message for each field of the dataclass ``config`` whose value is not among the
    choices of its ``Literal`` annotation (for configs built directly, not from plain values)."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for f in dataclasses.fields(config):
        choices = literal_choices(hints[f.name])
        value = getattr(config, f.name)
        if (
            choices is not None
            and value not in choices
            and not (value is None and fits(None, hints[f.name]))
        ):
            problems.append(f"{f.name} must be one of {choices}, not {value!r}")
    return problems


def literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` annotation allows (``X | None`` included), else ``None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        return typing.get_args(literals[0]) if literals else None
    return args if typing.get_origin(hint) is typing.Literal else None
