"""Calling a compiled kernel without Numba's dispatcher.

A call through a ``numba.njit`` dispatcher types every argument first (in C, through a
fingerprint cache: about a microsecond for the cpu kernels' argument tuples of 20-odd fields),
then finds the overload and calls its entry point, the CPython wrapper that unboxes the arguments
and runs the machine code. A call plan (``engine.plan``) has already fixed the argument types, so
after the first call it calls the overload's entry point directly.

The entry point unboxes its arguments for the types it was compiled for, and does not check them
again: it must only be called with arguments of exactly those types (the plan's key guarantees
it: shapes, dtypes and flags of every array, the types of every scalar).
"""

from __future__ import annotations

__all__ = ["resolve_entry_point", "canonical_entry", "Bound"]

#: kernel argument fields (of the namedtuple a kernel takes first) compiled as read-only arrays:
#: q, k, v are only read, and a caller's read-only view would otherwise compile a second overload
READ_ONLY_FIELDS = frozenset(("q", "k", "v"))
#: fields compiled with layout "A": masks arrive as broadcast views ("A") or whole ("C")
ANY_LAYOUT_FIELDS = frozenset(("fmask", "bmask"))


def resolve_entry_point(dispatcher, args: tuple):
    """The entry point of the overload of ``dispatcher`` that a call with ``args`` runs, or None
    (not compiled for exactly these types yet, or not a CPU dispatcher): call the dispatcher once
    first so that it compiles or loads the overload. A kernel that calls its task by address
    (``engine.kernels.task_pointer.TaskKernel``) answers through its ``entry_point_for``."""
    own = getattr(dispatcher, "entry_point_for", None)
    if own is not None:
        return own(args)
    overloads = getattr(dispatcher, "overloads", None)
    typeof = getattr(dispatcher, "typeof_pyval", None)
    if overloads is None or typeof is None:
        return None
    try:
        sig = tuple(typeof(a) for a in args)
    except Exception:  # a value Numba cannot type: the dispatcher itself will say so
        return None
    cres = overloads.get(sig)
    return getattr(cres, "entry_point", None)


def _canonical_signature(dispatcher, args: tuple) -> tuple:
    from numba.core import types

    first, rest = args[0], args[1:]
    fields = first._fields
    tys = []
    for name, t in zip(fields, dispatcher.typeof_pyval(first).types):
        if isinstance(t, types.Array):
            if name in READ_ONLY_FIELDS:
                t = t.copy(readonly=True)
            if name in ANY_LAYOUT_FIELDS:
                t = t.copy(layout="A")
        tys.append(t)
    return (types.BaseTuple.from_types(tys, type(first)),) + tuple(dispatcher.typeof_pyval(a) for a in rest)


def canonical_entry(dispatcher, args: tuple):
    """The entry point of ``dispatcher``'s overload for ``args`` (a kernel's argument namedtuple
    first) with q, k, v typed read-only and the masks with layout "A" (:data:`READ_ONLY_FIELDS`,
    :data:`ANY_LAYOUT_FIELDS`), compiled or loaded from the disk cache on first use; None where it
    does not apply (the dispatcher is then called as it is).

    Numba types a read-only array and a writeable one, or a contiguous mask and a broadcast one,
    apart, and compiles the whole kernel (seconds) for each combination it meets. The read-only,
    any-layout overload runs every combination: its entry point reads the arrays' data, shape and
    strides whatever their flags (what Numba's dispatcher does when it converts a "C" array for an
    "A" overload). Memoised per dispatcher by the arguments' Numba fingerprints (about 6 us for
    the forward's 28 fields; the call plans store the entry point instead)."""
    from numba._dispatcher import compute_fingerprint

    memo = getattr(dispatcher, "_attention_engine_entries", None)
    if memo is None:
        if not hasattr(dispatcher, "typeof_pyval") or not hasattr(args[0], "_fields"):
            return None
        memo = dispatcher.__dict__.setdefault("_attention_engine_entries", {})  # atomic: one memo
    try:
        key = tuple(map(compute_fingerprint, args))
    except Exception:  # a value without a fingerprint (Numba types it the slow way): no memo
        return None
    entry = memo.get(key)
    if entry is None:
        from .threads import configure_threading_layer

        # compiling a parallel kernel starts Numba's thread pool: the engine's layer (TBB, loaded
        # from the environment) must be chosen first, as kernel_call_guard does before a call
        configure_threading_layer()
        entry = memo[key] = dispatcher.compile(_canonical_signature(dispatcher, args))
    return entry


class Bound:
    """A dispatcher called with arguments whose Numba types never change (a call plan fixes
    them): the first call goes through the dispatcher (which compiles or loads the overload), the
    later ones straight to that overload's entry point. One per plan and kernel: never share one
    between callers whose argument types may differ."""

    __slots__ = ("dispatcher", "entry")

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.entry = None

    def __call__(self, *args):
        entry = self.entry
        if entry:
            return entry(*args)
        result = self.dispatcher(*args)
        if entry is None:  # once: False when no exact overload is found (then the dispatcher)
            self.entry = resolve_entry_point(self.dispatcher, args) or False
        return result
