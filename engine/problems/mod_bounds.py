"""A mod that indexes an array of ``mod_args`` past its end reads whatever memory follows it in
the compiled kernels (Numba checks no bounds there). ``probe_mod_bounds`` calls the mods' Python
functions at the corners of the index ranges a call gives them, where NumPy checks bounds, so a
table too small for the problem is a clear error before a kernel runs."""

from __future__ import annotations

import itertools
import warnings

import numpy as np

__all__ = ["mod_ranges", "probe_mod_bounds"]


def mod_ranges(batch: int, heads: int, q_range: tuple, kv_range: tuple) -> dict:
    """The ranges :func:`probe_mod_bounds` takes: ``b < batch``, ``h < heads``, and the inclusive
    ``(lo, hi)`` of ``q_idx`` and ``kv_idx``."""
    return {"b": (0, batch - 1), "h": (0, heads - 1), "q_idx": q_range, "kv_idx": kv_range}


def probe_mod_bounds(score_mod, mask_mod, mod_args: tuple, ranges: dict) -> None:
    """Call each mod in Python at every corner of ``ranges``, ``{"b": (lo, hi), "h": ..., "q_idx":
    ..., "kv_idx": ...}`` (inclusive bounds of the indices the kernels pass; an empty range skips
    the probe), with ``mod_args`` (native arrays and numbers).

    An index that is a linear function of ``b``, ``h``, ``q_idx`` and ``kv_idx`` (a table per head,
    a relative-position table indexed by ``q_idx - kv_idx + offset``) takes its extreme values at
    the corners, so a table too small for them is found. An index read from another array
    (``table[doc[q_idx]]``) is checked only where the corners lead; the kernels themselves check
    nothing. Only NumPy's bounds errors count (an ``IndexError`` saying "is out of bounds for
    axis"): anything else a mod raises in Python (its own ``IndexError``, a typed List's, a
    division by the score 0.0, a Numba-only call) is left to the kernels, which define their own
    behaviour.

    Memoised by the mods, the ranges, the numbers' values, the arrays' dtypes and shapes, and the
    values of arrays of at most :data:`_BY_VALUE` entries (an offset passed as a 0-d array or a
    small per-head array), so a call plan's cached calls (which call this too) pay a dictionary
    lookup.

    :raises ValueError: naming the mod, the indices, the ranges and the shapes of ``mod_args``.
    """
    if any(hi < lo for lo, hi in ranges.values()):
        return
    key = (score_mod, mask_mod, tuple(map(_arg_key, mod_args)), tuple(ranges.values()))
    if key in _probed:  # a call plan's later calls: one lookup
        return
    corners = itertools.product(*({lo, hi} for lo, hi in ranges.values()))
    mods = [(n, getattr(m, "py_func", m)) for n, m in (("score_mod", score_mod), ("mask_mod", mask_mod)) if m]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for index in corners:
            for name, fn in mods:
                args = ((0.0,) if name == "score_mod" else ()) + tuple(index) + tuple(mod_args)
                try:
                    fn(*args)
                except IndexError as exc:
                    if "is out of bounds for axis" not in str(exc):  # not NumPy's: the kernels'
                        continue
                    raise ValueError(_message(name, fn, index, ranges, mod_args, exc)) from None
                except Exception:  # noqa: BLE001 - not a bounds question; the kernels decide
                    pass
    if len(_probed) > 4096:  # mods made in a loop: forget, rather than hold them all
        _probed.clear()
    _probed[key] = True


#: the probes that passed, by mods, ``mod_args`` shapes and numbers, and ranges
_probed: dict = {}


#: arrays of at most this many entries are told apart by their values too (an offset as a 0-d array)
_BY_VALUE = 16


def _arg_key(a):
    """What the corners' outcome depends on besides the mods and the ranges: a number's value (an
    offset added to an index), an array's dtype and shape, and a small array's values. The values
    of larger arrays (tables) are not keyed: an index read from them is not probed apart."""
    if isinstance(a, np.ndarray):
        return (a.dtype.str, a.shape, a.tobytes() if a.size <= _BY_VALUE else None)
    try:
        hash(a)
    except TypeError:  # a Numba typed List or Dict (mutable): keyed by identity
        return (type(a), "id", id(a))
    return (type(a), a)


def _message(name, fn, index, ranges, mod_args, exc) -> str:
    at = ", ".join(f"{k}={i}" for k, i in zip(ranges, index))
    spans = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in ranges.items())
    shapes = ", ".join(
        f"mod_args[{i}]: shape {a.shape}" if isinstance(a, np.ndarray) else f"mod_args[{i}]: {a!r}"
        for i, a in enumerate(mod_args)
    )
    return (
        f"{name} {getattr(fn, '__qualname__', fn)!r} indexes outside its mod_args at {at} ({exc}); "
        f"this call gives it {spans}, and {shapes or 'no mod_args'}. The compiled kernels do not "
        "check bounds: size the arrays for every index the call passes"
    )
