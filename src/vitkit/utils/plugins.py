"""Plugins: modules that other installed packages register under the entry point group
``vitkit.plugins``, imported once so that what they register (architectures, named models,
tasks, evaluators, data sources, checkpoint formats) is there before anyone looks.

A package declares one in its ``pyproject.toml``::

    [project.entry-points."vitkit.plugins"]
    deit = "vitkit_deit"

Registries call ``ensure_loaded`` before every lookup, with the modules that hold their own
built-in entries: what is registered then no longer depends on which module happened to be
imported first. A plugin that fails to import costs one warning naming it and the error;
the rest of vitkit (and the other plugins) work on. This module sits at the bottom of the
layers: it names vitkit's modules as strings and imports nothing of vitkit itself.
"""

from __future__ import annotations

import importlib
import logging
import os
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

GROUP = "vitkit.plugins"

_loaded: dict[str, str | None] = {}  # entry point name -> None (imported) or the error
_started = False


def load_plugins() -> dict[str, str | None]:
    """Import every module registered under ``GROUP`` (once per process; later calls return
    the first call's outcome): each entry point's name mapped to ``None`` if it loaded, else
    the error it raised, which is also logged as one warning line."""
    global _started
    if _started:  # also while loading: a plugin that looks something up does not recurse
        return dict(_loaded)
    _started = True
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        if point.name in _loaded:
            continue
        try:
            point.load()
            _loaded[point.name] = None
        except Exception as err:  # a broken plugin must not take the command down with it
            _loaded[point.name] = f"{type(err).__name__}: {err}"
            # Under torchrun every process loads the plugins: the first one says it, once.
            level = logging.WARNING if os.environ.get("RANK", "0") == "0" else logging.DEBUG
            logger.log(
                level,
                "vitkit plugin %r (%s) failed to load and is skipped: %s",
                point.name,
                point.value,
                _loaded[point.name],
            )
    return dict(_loaded)


def ensure_loaded(*builtin_modules: str, plugins: bool = True) -> None:
    """Import ``builtin_modules`` (a registry's own entries, named by module path) and then
    (unless not ``plugins``) the plugins: what a registry calls before it answers a lookup.
    Registering calls it without plugins: a plugin being imported may be the one registering,
    and must not meet the others half-imported."""
    for module in builtin_modules:
        importlib.import_module(module)
    if plugins:
        load_plugins()


__all__ = ["GROUP", "ensure_loaded", "load_plugins"]
