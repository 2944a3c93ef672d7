"""Choosing a backend for a problem, and explaining every refusal: ``select(name, problem)`` gives
the backend and its op for the problem's type; the public functions then call ``op.run(problem)``."""

from __future__ import annotations

from .backends.base import Backend, Op
from .backends.registry import backend_registry
from .problems.base import Problem
from .runtime.errors import NotSupportedError

__all__ = ["list_backends", "get_backend", "select", "select_backend", "not_supported_reasons"]


def list_backends() -> list[str]:
    """Sorted names of every registered backend (available on this machine or not)."""
    return sorted(backend_registry())


def get_backend(name: str) -> Backend:
    """The backend instance called ``name``; ``ValueError`` listing the names if unknown.

    :param name: a name from :func:`list_backends`.
    """
    backends = backend_registry()
    if not isinstance(name, str) or name not in backends:
        raise ValueError(f"unknown backend {name!r}; available: auto, {', '.join(sorted(backends))}")
    return backends[name]


def not_supported_reasons(problem: Problem) -> dict[str, list[str]]:
    """For every backend, why it cannot run ``problem`` (an empty list when it can)."""
    return {name: b.not_supported_reasons(problem) for name, b in sorted(backend_registry().items())}


def select_backend(name: str, problem: Problem) -> Backend:
    """The backend to run ``problem`` on.

    ``"auto"`` takes the highest-priority backend with no reasons; an explicit name that cannot run
    the problem raises :class:`~engine.runtime.errors.NotSupportedError` (a ``ValueError``) listing its
    reasons, as does ``"auto"`` when no backend can.
    """
    if name == "auto":
        for backend in sorted(backend_registry().values(), key=lambda b: -b.priority):
            if not backend.not_supported_reasons(problem):
                return backend
        reasons = not_supported_reasons(problem)
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
        raise NotSupportedError(f"no backend can run these inputs ({detail})", reasons)
    backend = get_backend(name)
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        raise NotSupportedError(f"backend {name!r} cannot run these inputs: {'; '.join(reasons)}", {name: reasons})
    return backend


def select(name: str, problem: Problem) -> tuple[Backend, Op]:
    """``(backend, op)``: :func:`select_backend`'s choice and its op for the problem's type."""
    backend = select_backend(name, problem)
    return backend, backend.op(type(problem))
