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
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import PluginError

__all__ = [
    "get_plugin_manager",
    "register_plugin",
    "unregister_plugin",
    "list_variants",
    "get_variant",
    "variant_info",
    "backend_registry",
    "PluginError",
]

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


@dataclass(frozen=True)
class VariantInfo:
    """Where a variant comes from: what ``attention-engine list`` prints."""

    name: str
    cls: type
    plugin: str
    distribution: str

    @property
    def description(self) -> str:
        return self.cls.description


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_distributions: dict[str, str] = {}  # plugin name -> distribution name
_variants: dict[str, VariantInfo] | None = None
_conflicts: dict[str, list[VariantInfo]] = {}
_backends: dict | None = None


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


def _invalidate() -> None:
    global _variants, _backends
    _variants = None
    _backends = None


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


def _variant_problem(cls) -> str | None:
    from .variant import Variant

    if not isinstance(cls, type) or not issubclass(cls, Variant):
        return f"{cls!r} is not a subclass of engine.Variant"
    if not isinstance(cls.__dict__.get("name"), str) or not cls.name:
        return f"{cls.__qualname__} does not declare its own non-empty class attribute 'name'"
    if not isinstance(cls.description, str) or not cls.description:
        return f"{cls.__qualname__} (variant {cls.name!r}) has no 'description'"
    if cls.forward is Variant.forward:
        return f"{cls.__qualname__} (variant {cls.name!r}) does not implement forward()"
    return None


def _collect_variants():
    found: dict[str, list[VariantInfo]] = {}
    for plugin, dist, classes in _hook_results("attention_variants"):
        for cls in classes:
            problem = _variant_problem(cls)
            if problem:
                _warn(f"plugin {plugin!r} (distribution {dist!r}): {problem}; skipped")
                continue
            found.setdefault(cls.name, []).append(VariantInfo(cls.name, cls, plugin, dist))
    ok = {n: infos[0] for n, infos in found.items() if len(infos) == 1}
    conflicts = {n: infos for n, infos in found.items() if len(infos) > 1}
    return ok, conflicts


def _describe_conflict(name: str, infos) -> str:
    who = " and ".join(f"plugin {i.plugin!r} (distribution {i.distribution!r})" for i in infos)
    return f"variant name {name!r} is offered by both {who}"


def _registry() -> dict[str, VariantInfo]:
    global _variants, _conflicts
    with _lock:
        if _variants is None:
            _variants, _conflicts = _collect_variants()
            for name, infos in _conflicts.items():
                _warn(_describe_conflict(name, infos) + "; neither can be selected until one is removed")
        return _variants


def variant_info() -> tuple[dict[str, VariantInfo], dict[str, list[VariantInfo]]]:
    """(selectable variants by name, conflicting names with every plugin offering them)."""
    variants = _registry()
    return dict(variants), dict(_conflicts)


def list_variants() -> list[str]:
    """Sorted names of every selectable variant."""
    return sorted(_registry())


def get_variant(name: str, **params):
    """A new instance of the variant called ``name``, constructed with ``params``."""
    variants = _registry()
    if name in _conflicts:
        raise PluginError(_describe_conflict(name, _conflicts[name]))
    if name not in variants:
        raise ValueError(f"unknown variant {name!r}; available: {', '.join(sorted(variants))}")
    return variants[name].cls(**params)


def register_plugin(plugin, name: str | None = None) -> str:
    """Register a plugin object or module at run time; returns the name it is registered under.

    Raises ``PluginError`` (and registers nothing) if it implements unknown hooks, offers a
    malformed variant, offers a variant name that is already taken (naming both plugins), or if
    ``name`` is blocked by ``ATTENTION_ENGINE_BLOCK_PLUGINS``.
    """
    with _lock:
        pm = get_plugin_manager()
        try:
            plugin_name = pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from None
        if plugin_name is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked ({BLOCK_ENV})")
        _distributions[plugin_name] = "(registered at run time)"
        try:
            pm.check_pending()
            _check_own_variants(pm, plugin_name)
            _invalidate()
            _, conflicts = _collect_variants()
            mine = [infos for infos in conflicts.values() if any(i.plugin == plugin_name for i in infos)]
            if mine:
                raise PluginError("; ".join(_describe_conflict(i[0].name, i) for i in mine))
        except Exception:
            pm.unregister(name=plugin_name)
            _distributions.pop(plugin_name, None)
            raise
        finally:
            _invalidate()
        return plugin_name


def _check_own_variants(pm: pluggy.PluginManager, plugin_name: str) -> None:
    """Raise ``PluginError`` if the plugin's ``attention_variants`` hook raises or is malformed."""
    for impl in pm.hook.attention_variants.get_hookimpls():
        if impl.plugin_name != plugin_name:
            continue
        try:
            classes = list(impl.function() or ())
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r}: hook attention_variants raised {type(exc).__name__}: {exc}"
            ) from exc
        for cls in classes:
            problem = _variant_problem(cls)
            if problem:
                raise PluginError(f"plugin {plugin_name!r}: {problem}")


def unregister_plugin(name: str) -> None:
    """Remove the plugin registered under ``name``; ``ValueError`` if there is none."""
    with _lock:
        pm = get_plugin_manager()
        if not pm.has_plugin(name):
            raise ValueError(
                f"no plugin registered under {name!r}; registered: "
                f"{', '.join(sorted(n for n, _ in pm.list_name_plugin()))}"
            )
        pm.unregister(name=name)
        _distributions.pop(name, None)
        _invalidate()


def backend_registry() -> dict:
    """Backend instances by name, from every plugin's ``attention_backends`` hook."""
    global _backends
    with _lock:
        if _backends is None:
            from .backends.base import Backend

            found = {}
            for plugin, dist, classes in _hook_results("attention_backends"):
                for cls in classes:
                    if not (isinstance(cls, type) and issubclass(cls, Backend) and cls.name):
                        _warn(
                            f"plugin {plugin!r} (distribution {dist!r}): {cls!r} is not a named "
                            "engine.backends.Backend subclass; skipped"
                        )
                    elif cls.name in found:
                        _warn(
                            f"plugin {plugin!r} (distribution {dist!r}): backend name "
                            f"{cls.name!r} is already taken; skipped"
                        )
                    else:
                        found[cls.name] = cls()
            _backends = found
        return _backends
