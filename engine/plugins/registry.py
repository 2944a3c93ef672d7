"""The variant registry: every variant the plugins offer, selectable by name, and run-time
registration of plugins (checked before they are accepted)."""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

from ..runtime.errors import PluginError
from .manager import (
    BLOCK_ENV,
    _distributions,
    _hook_results,
    _lock,
    _warn,
    add_listener,
    get_plugin_manager,
    invalidate,
)

__all__ = ["list_variants", "get_variant", "variant_info", "register_plugin", "unregister_plugin", "VariantInfo"]

_variants: dict | None = None
_conflicts: dict = {}


def _reset() -> None:
    global _variants
    _variants = None


add_listener(_reset)


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


def _variant_problem(cls) -> str | None:
    from ..variant import Variant

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
    """A new instance of the variant called ``name``, constructed with ``params``.

    :param name: a name from :func:`list_variants`.
    :param params: the variant class's constructor arguments (``embed_dim``, ``num_heads``,
        ``dtype``, ``seed``...).
    :type params: Any
    """
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

    :param plugin: a module, class or object with ``@engine.hookimpl`` functions.
    :type plugin: object
    :param name: the name to register it under (default: pluggy's).
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
            invalidate()
            _, conflicts = _collect_variants()
            mine = [infos for infos in conflicts.values() if any(i.plugin == plugin_name for i in infos)]
            if mine:
                raise PluginError("; ".join(_describe_conflict(i[0].name, i) for i in mine))
        except Exception:
            pm.unregister(name=plugin_name)
            _distributions.pop(plugin_name, None)
            raise
        finally:
            invalidate()
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
    """Remove the plugin registered under ``name``; ``ValueError`` if there is none.

    :param name: the name :func:`register_plugin` returned.
    """
    with _lock:
        pm = get_plugin_manager()
        if not pm.has_plugin(name):
            raise ValueError(
                f"no plugin registered under {name!r}; registered: "
                f"{', '.join(sorted(n for n, _ in pm.list_name_plugin()))}"
            )
        pm.unregister(name=name)
        _distributions.pop(name, None)
        invalidate()
