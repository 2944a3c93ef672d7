"""The backend registry: backend instances by name, from every plugin's ``attention_backends``
hook (apart from the variant registry, so that dispatch never imports the variants)."""

from __future__ import annotations

from ..plugins.manager import _hook_results, _lock, _warn, add_listener
from .base import Backend

__all__ = ["backend_registry"]

_backends: dict | None = None


def _reset() -> None:
    global _backends
    _backends = None


add_listener(_reset)


def backend_registry() -> dict:
    """Backend instances by name, from every plugin's ``attention_backends`` hook."""
    global _backends
    with _lock:
        if _backends is None:
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
