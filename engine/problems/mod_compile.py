"""Compiling the mods on their own, for the signature the ``cpu`` kernels call them with, before
a kernel is compiled around them (``compile_mods_alone``): Numba's errors and warnings then point at
the mod's own lines."""

from __future__ import annotations

import numpy as np
from numba.core import types

__all__ = ["compile_mods_alone"]

_compiled_alone: dict = {}


def compile_mods_alone(score_mod, mask_mod, mod_args: tuple, score_dtype) -> None:
    """Compile the (validated) mods on their own for the signature the ``cpu`` kernels call them
    with: ``score_mod(score_dtype, int64 b, h, q_idx, kv_idx, *mod_args)`` and ``mask_mod(int64
    b, h, q_idx, kv_idx, *mod_args)``, before a kernel is compiled around them.

    A mod Numba cannot type then fails with Numba's ``TypingError`` from its own compilation, and
    what Numba warns while typing it (e.g. a ``NumbaTypeSafetyWarning`` for a dict of undefined
    types) points at the mod's source line, not at the kernel line that calls it. The kernel then
    reuses these compiled versions (same signature). Memoised per mods, dtype and argument kinds,
    so a call with compiled mods pays a dictionary lookup. A mod taking ``*args`` (a wrapper, as
    ``engine.distributed``'s shifted mods) is left to the kernel: Numba compiles a star-args
    function for an explicit signature only through its caller."""
    if score_mod is None and mask_mod is None:
        return
    key = (score_mod, mask_mod, np.dtype(score_dtype), tuple(_arg_kind(a) for a in mod_args))
    if key in _compiled_alone:
        return
    from numba import from_dtype, typeof

    args = tuple(typeof(a) for a in mod_args)
    index = (types.int64,) * 4
    if score_mod is not None and not _takes_star_args(score_mod):
        sig = (from_dtype(np.dtype(score_dtype)),) + index + args
        score_mod.compile(sig)
        _check_return(score_mod, sig, "score_mod", "a real number (the new score)", _SCORES)
    if mask_mod is not None and not _takes_star_args(mask_mod):
        mask_mod.compile(index + args)
        _check_return(mask_mod, index + args, "mask_mod", "a bool (True: may attend)", _MASKS)
    if len(_compiled_alone) > 4096:  # mods made in a loop: forget, rather than hold them all
        _compiled_alone.clear()
    _compiled_alone[key] = True


#: what the kernels can store as a score, and test as a mask
_SCORES = (types.Integer, types.Float, types.Boolean)
_MASKS = (types.Boolean, types.Integer, types.Float)


def _check_return(mod, sig: tuple, what: str, wanted: str, kinds: tuple) -> None:
    """``TypeError`` naming the mod when what it returns for ``sig`` is not of ``kinds`` (a
    complex, a tuple, an array, or None on some path), before a kernel fails to store it."""
    returned = mod.overloads[sig].signature.return_type
    if not isinstance(returned, kinds):
        fn = getattr(mod, "py_func", mod)
        raise TypeError(
            f"{what} {getattr(fn, '__qualname__', fn)} returns {returned} for arguments "
            f"({', '.join(map(str, sig))}); it must return {wanted} on every path"
        )


def _takes_star_args(mod) -> bool:
    import inspect

    params = inspect.signature(getattr(mod, "py_func", mod)).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _arg_kind(a):
    """What Numba's type of a mod argument depends on (a NumPy array's dtype, rank and layout)."""
    if isinstance(a, np.ndarray):
        layout = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "A"
        return (a.dtype.str, a.ndim, layout, a.flags.writeable, a.flags.aligned)
    if isinstance(a, (tuple, list)):
        return (type(a), tuple(_arg_kind(x) for x in a))
    return type(a)
