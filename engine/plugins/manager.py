"""The plugin manager: built lazily, on first use, never at import time.

Order: the built-in variant modules and the built-in backends, then every entry point in the group
``attention_engine``, then whatever ``register_plugin`` adds. A plugin that fails to import, whose
hook raises, or that offers a malformed variant is skipped with a warning naming it and its
distribution; the others keep working.

Loading an entry point imports its module, which runs its code. As pytest's
``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` and ``-p no:name``, two environment variables, read when the
plugin manager is built, limit that: ``ATTENTION_ENGINE_DISABLE_PLUGIN_AUTOLOAD`` (any non-empty
value) loads no entry point at all, and ``ATTENTION_ENGINE_BLOCK_PLUGINS`` (comma-separated plugin
names, as ``attention-engine list`` shows them) blocks those names: such an entry point is never
imported, and ``register_plugin`` refuses the name.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from importlib.metadata import entry_points

import pluggy

from . import hookspecs

__all__ = ["get_plugin_manager", "add_listener", "invalidate", "BUILTIN_PLUGINS"]

BUILTIN_PLUGINS = (
    "engine.backends",
    "variants.self_attention",
    "variants.multi_head",
    "variants.cross",
    "variants.masked",
    "variants.sliding_window",
    "variants.alibi",
    "variants.softcap",
    "variants.grouped_query",
    "variants.document",
)
DISTRIBUTION = "attention-engine"
DISABLE_AUTOLOAD_ENV = "ATTENTION_ENGINE_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "ATTENTION_ENGINE_BLOCK_PLUGINS"


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_distributions: dict[str, str] = {}  # plugin name -> distribution name
#: called (with no argument) whenever the set of plugins changes: the registries drop what they built
_listeners: list = []


def _warn(msg: str) -> None:
    warnings.warn(f"attention-engine: {msg}", RuntimeWarning, stacklevel=3)


def _drop_unknown_hooks(pm: pluggy.PluginManager) -> None:
    """Like ``check_pending``, but an offending plugin is unregistered with a warning."""
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin)
            pm.unregister(exc.plugin)
            _warn(f"skipping plugin {name!r} (distribution {_distributions.get(name, '?')!r}): {exc}")


def _build() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in os.environ.get(BLOCK_ENV, "").split(","):
        if name.strip():
            pm.set_blocked(name.strip())
    for modname in BUILTIN_PLUGINS:
        if pm.is_blocked(modname):
            continue
        try:
            pm.register(importlib.import_module(modname), name=modname)
            _distributions[modname] = DISTRIBUTION
        except Exception as exc:  # a broken install must not take the engine down
            _warn(f"skipping built-in plugin {modname!r}: {type(exc).__name__}: {exc}")
    autoload = () if os.environ.get(DISABLE_AUTOLOAD_ENV) else entry_points(group=hookspecs.PROJECT)
    for ep in autoload:
        dist = ep.dist.name if ep.dist is not None else "?"
        if pm.get_plugin(ep.value) is not None or pm.is_blocked(ep.name):
            continue  # a built-in plugin registered above under its module name, or a blocked one
        try:
            plugin = ep.load()
        except Exception as exc:
            _warn(
                f"skipping plugin {ep.name!r} from distribution {dist!r}: it failed to import "
                f"({type(exc).__name__}: {exc})"
            )
            continue
        if pm.is_registered(plugin):
            continue
        if pm.has_plugin(ep.name):
            _warn(
                f"skipping plugin {ep.name!r} from distribution {dist!r}: the name is already taken "
                f"by distribution {_distributions.get(ep.name, '?')!r}"
            )
            continue
        try:
            pm.register(plugin, name=ep.name)
            _distributions[ep.name] = dist
        except ValueError as exc:
            _warn(f"skipping plugin {ep.name!r} from distribution {dist!r}: {exc}")
    _drop_unknown_hooks(pm)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first call."""
    global _pm
    with _lock:
        if _pm is None:
            _pm = _build()
        return _pm


def add_listener(fn) -> None:
    """Call ``fn()`` whenever a plugin is registered or unregistered (the registries built from the
    hooks' results register their reset here, so this module needs to know none of them)."""
    with _lock:
        _listeners.append(fn)


def invalidate() -> None:
    """Tell every listener that the plugins changed."""
    with _lock:
        for fn in _listeners:
            fn()


def _hook_results(hook_name: str):
    """(plugin name, distribution, result) per plugin; a hook that raises is skipped with a warning."""
    pm = get_plugin_manager()
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        dist = _distributions.get(impl.plugin_name, "?")
        try:
            result = impl.function()
        except Exception as exc:
            _warn(
                f"plugin {impl.plugin_name!r} (distribution {dist!r}): hook {hook_name} raised "
                f"{type(exc).__name__}: {exc}; its contributions are skipped"
            )
            continue
        yield impl.plugin_name, dist, list(result or ())
