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

__all__ = ["resolve_entry_point", "Bound"]


def resolve_entry_point(dispatcher, args: tuple):
    """The entry point of the overload of ``dispatcher`` that a call with ``args`` runs, or None
    (not compiled for exactly these types yet, or not a CPU dispatcher): call the dispatcher once
    first so that it compiles or loads the overload."""
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
