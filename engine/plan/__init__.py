"""Cached call plans: what a public function's first call with a given signature works out once.

A call's *signature* is what decides how it runs: shapes, dtypes, memory-layout flags, the boolean
flags, the backend name, the mods (by identity) and the types of ``mod_args``, the GEMM provider
selection and the thread count. The first call with a signature validates fully, selects the
backend and stores a :class:`Plan`: the validated problem's fields that the signature decides, the
(backend, op), and the op's prepared runner where the op offers one (``op.prepare(problem)``:
tiles, GEMM pointer, the compiled kernel's entry point). A later call with the same signature
looks the plan up with one dict access and checks only what can differ between two such calls
(values: the scale, ``cache_seqlens``, page tables, ``mod_args`` contents; array identity and
overlap), with the very functions the full validation uses, so it raises the same errors.

The cache is thread-safe (a dict read is atomic; stores and clears take a lock; a plan never
changes once stored, except for the entry point its runner may record on first use, a benign
race), bounded (:data:`MAX_PLANS`), and cleared whenever a plugin is registered or unregistered.
The thread count, the GEMM provider selection and the tuning state are part of every key
(:func:`runtime_token`), so ``set_num_threads``, ``thread_limit``, ``set_gemm_provider``,
``ATTENTION_ENGINE_GEMM``, ``set_autotune``, ``ATTENTION_ENGINE_AUTOTUNE`` and a tile or provider
measured since take effect on the next call. The capability-specific keys live beside this module
(``engine.plan.forward``, ``engine.plan.decode``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..plugins.manager import add_listener
from ..runtime.process_state import runtime_token

__all__ = [
    "Plan",
    "MAX_PLANS",
    "lookup",
    "store",
    "invalidate",
    "plan_count",
    "array_key",
    "mod_args_key",
    "runtime_token",
    "fast_problem",
]

#: plans kept at most; past it the cache starts over (a loop over many shapes rebuilds its plans)
MAX_PLANS = 512

_plans: dict = {}
_lock = threading.Lock()


class Plan:
    """What a signature decides. ``backend``/``op``: the dispatcher's choice; ``problem_type`` and
    ``fields``: the validated problem's fields but the per-call ones, to rebuild a problem cheaply
    (:func:`fast_problem`); ``runner``: ``op.prepare(problem)`` (a callable of a problem), or None,
    then ``op.run`` runs it; ``plain``: the runner's shorter path for the calls its capability
    module knows to be plain (the runner's ``plain`` attribute, a callable of the per-call arrays
    and values; None where it has none); ``extra``: what the capability's own module needs per
    call (views to rebuild, defaults)."""

    __slots__ = ("backend", "op", "problem_type", "fields", "runner", "plain", "extra")

    def __init__(self, backend, op, problem, per_call: tuple, extra: Any = None):
        self.backend = backend
        self.op = op
        self.problem_type = type(problem)
        self.fields = {k: v for k, v in problem.__dict__.items() if k not in per_call}
        prepare = getattr(op, "prepare", None)
        self.runner = prepare(problem) if prepare is not None else None
        self.plain = getattr(self.runner, "plain", None)
        self.extra = extra

    def run(self, problem):
        """The problem's result on the plan's op (its prepared runner where it has one)."""
        runner = self.runner
        return runner(problem) if runner is not None else self.op.run(problem)


def fast_problem(plan: Plan, fields: dict):
    """A problem of the plan's type with its signature fields and ``fields`` (the per-call ones),
    built without the dataclass ``__init__`` (a frozen dataclass sets each field through
    ``object.__setattr__``: microseconds)."""
    problem = object.__new__(plan.problem_type)
    d = plan.fields.copy()
    d.update(fields)
    object.__setattr__(problem, "__dict__", d)
    return problem


def lookup(key):
    """The plan stored under ``key``, or None (also for a key that cannot be hashed)."""
    try:
        return _plans.get(key)
    except TypeError:  # an unhashable mod or mod_args entry: no plan
        return None


def store(key, plan: Plan) -> None:
    try:
        hash(key)
    except TypeError:
        return
    with _lock:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = plan


def invalidate() -> None:
    """Forget every plan (a plugin was registered or unregistered: backends may have changed)."""
    with _lock:
        _plans.clear()


def plan_count() -> int:
    """How many plans are stored (tests and the benchmark's breakdown read it)."""
    return len(_plans)


add_listener(invalidate)


def array_key(a):
    """The signature of a NumPy array: shape, dtype (byte order included) and flags (contiguity,
    alignment, writeability), which decide the kernel's Numba types; None for anything else."""
    if type(a) is not np.ndarray:
        return None
    return (a.shape, a.dtype, a.flags.num)


_INT64 = (-(2**63), 2**63)


def mod_args_key(mod_args):
    """The signature of a ``mod_args`` tuple: each entry's type, as Numba will type it (arrays by
    dtype, dimensions and flags: contiguity, alignment, writeability; Python and NumPy scalars by
    type). None when an entry is of another kind (the call then takes the full path)."""
    if type(mod_args) is not tuple:
        return None
    if not mod_args:
        return ()
    out = []
    for a in mod_args:
        t = type(a)
        if t is np.ndarray:  # the flags decide whether native_mod_args copies it, and its type
            out.append((a.dtype, a.ndim, a.flags.num))
        elif t is int:
            if not _INT64[0] <= a < _INT64[1]:
                return None
            out.append(int)
        elif t is float or t is bool or t is complex or isinstance(a, np.generic):
            out.append(t)
        else:
            return None
    return tuple(out)
