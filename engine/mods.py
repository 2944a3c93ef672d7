"""``score_mod`` and ``mask_mod``: attention patterns written as plain Python functions.

This is FlexAttention's idea on Numba. A ``score_mod(score, b, h, q_idx, kv_idx, *mod_args) ->
score`` rewrites one scaled score. A ``mask_mod(b, h, q_idx, kv_idx, *mod_args) -> bool`` says
whether query ``q_idx`` may attend to key ``kv_idx`` (True = may attend). Both are compiled with
``numba.njit`` and called inside the kernels, so a pattern never needs a dense L x S mask.

Captured parameters (per-head slopes, document ids...) are passed as an **explicit argument tuple**
``mod_args``. It is not a closure, so one compiled kernel serves every value of the parameters;
a closure over an array would freeze the array into the machine code and compile again for each new
one.

A :class:`BlockMask` records, once, which (query tile, key tile) blocks of a ``mask_mod`` are empty,
full or partial. Kernels skip empty blocks and evaluate the mask per element only in partial ones.
Build it with :func:`create_block_mask` and pass it again and again as ``block_mask=``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numba import types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

__all__ = ["BlockMask", "create_block_mask", "as_jit", "cast_like", "EMPTY", "PARTIAL", "FULL"]

from .config import BLOCK_MASK_K, BLOCK_MASK_Q
from .kernels.kinds import TILE_EMPTY as EMPTY, TILE_FULL as FULL, TILE_PARTIAL as PARTIAL

_jitted: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def as_jit(fn: Callable, what: str) -> Callable:
    """The ``numba.njit(error_model="numpy")`` version of a mod, compiled once per function object.

    A function that is already ``numba.njit``-compiled is used as it is; give it
    ``error_model="numpy"`` too if it divides, or the zero check keeps its loop scalar."""
    from numba.core.registry import CPUDispatcher

    if isinstance(fn, CPUDispatcher):
        return fn
    if not callable(fn):
        raise TypeError(f"{what} must be a function, got {type(fn).__name__}")
    if fn not in _jitted:
        import numba

        # NumPy's error model: x / 0 is inf/NaN, not an exception, so divisions vectorise
        _jitted[fn] = numba.njit(error_model="numpy")(fn)
    return _jitted[fn]


def cast_like(value, like):
    """``value`` converted to the float type of ``like`` (usually the score), in Python and in
    kernels. Mods use it to keep float32 scores in float32: NumPy's rules make int64 * float32 a
    float64, which halves the SIMD width and costs about 20% at L = 4096 for ALiBi."""
    return np.result_type(like).type(value)


@overload(cast_like, inline="always")
def _cast_like_overload(value, like):
    if not isinstance(like, types.Float):
        return None
    np_type = as_dtype(like).type

    return lambda value, like: np_type(value)


def python_function(fn: Callable) -> Callable:
    """The pure-Python function behind a mod (for the reference backend)."""
    return getattr(fn, "py_func", fn)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which (query tile, key tile) blocks a ``mask_mod`` leaves empty, partial or full.

    ``kinds`` has shape ``(Bm, Hm, ceil(L / block_q), ceil(S / block_k))`` with values EMPTY,
    PARTIAL, FULL. ``Bm``/``Hm`` are 1 when the mask was built with ``batch=None``/``heads=None``
    (it does not depend on b/h), else the batch and head counts.
    """

    mask_mod: Callable
    mod_args: tuple
    kinds: np.ndarray
    L: int
    S: int
    block_q: int
    block_k: int
    _by_tiles: dict = field(default_factory=dict, repr=False)

    def kinds_at(self, block_q: int, block_k: int) -> np.ndarray:
        """The tile map for other tile sizes, derived once and memoised."""
        want = (min(block_q, max(self.L, 1)), min(block_k, max(self.S, 1)))
        if want == (min(self.block_q, max(self.L, 1)), min(self.block_k, max(self.S, 1))):
            return self.kinds
        if want not in self._by_tiles:
            Bm, Hm = self.kinds.shape[:2]
            other = create_block_mask(self.mask_mod, Bm if Bm > 1 else None, Hm if Hm > 1 else None,
                                      self.L, self.S, mod_args=self.mod_args, block_q=block_q,
                                      block_k=block_k)
            self._by_tiles[want] = other.kinds
        return self._by_tiles[want]

    @property
    def density(self) -> float:
        """Fraction of blocks that are not empty (what the kernels actually visit)."""
        return float(np.mean(self.kinds != EMPTY)) if self.kinds.size else 0.0

    def check_compatible(self, batch: int, heads: int, L: int, S: int) -> None:
        """``ValueError`` naming the shapes if this block mask was built for another problem."""
        Bm, Hm = self.kinds.shape[:2]
        if (self.L, self.S) != (L, S) or Bm not in (1, batch) or Hm not in (1, heads):
            raise ValueError(f"block_mask was built for (batch, heads, L, S) = ({Bm}, {Hm}, {self.L}, "
                             f"{self.S}) but the inputs have ({batch}, {heads}, {L}, {S})")


def create_block_mask(mask_mod: Callable, batch: int | None, heads: int | None, L: int, S: int, *,
                      mod_args: tuple = (), block_q: int = BLOCK_MASK_Q, block_k: int = BLOCK_MASK_K) -> BlockMask:
    """Evaluate ``mask_mod`` once over every (b, h, q_idx, kv_idx) and classify the tiles.

    Pass ``batch=None``/``heads=None`` when the mask does not depend on ``b``/``h`` (it is then
    evaluated for b = h = 0 only). Cost: one mask evaluation per element, in parallel, and memory of
    one byte per tile.
    """
    from .kernels.block_sparsity import _classify_blocks
    from .threads import kernel_call_guard

    for name, val in (("L", L), ("S", S)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    for name, val in (("batch", batch), ("heads", heads)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name} must be a positive int or None, got {val!r}")
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    from .validation import native_mod_args

    mod_args = native_mod_args(mod_args)
    fn = as_jit(mask_mod, "mask_mod")
    kinds = np.empty((batch or 1, heads or 1, math.ceil(L / block_q), math.ceil(S / block_k)), np.int8)
    if kinds.size:
        with kernel_call_guard():
            _classify_blocks(fn, mod_args, L, S, block_q, block_k, kinds)
    return BlockMask(fn, mod_args, kinds, int(L), int(S), int(block_q), int(block_k))


def apply_mods_dense(scores: np.ndarray, score_mod, mask_mod, mod_args: tuple, kv_idx=None) -> np.ndarray:
    """The oracle: apply the mods elementwise to a materialised (B, H, L, S) float64 score array
    whose last axis holds the keys ``kv_idx`` (default: all of them, 0 ... S-1)."""
    B, H, L, S = scores.shape
    kv_idx = np.arange(S) if kv_idx is None else np.asarray(kv_idx)
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(H), np.arange(L), kv_idx, indexing="ij",
                             sparse=True)
    n = len(mod_args)
    if score_mod is not None:
        f = np.vectorize(python_function(score_mod), otypes=[np.float64],
                         excluded=set(range(5, 5 + n)))
        scores = f(scores, b, h, i, j, *mod_args) if scores.size else scores
    if mask_mod is not None:
        g = np.vectorize(python_function(mask_mod), otypes=[bool], excluded=set(range(4, 4 + n)))
        allowed = g(b, h, i, j, *mod_args) if scores.size else np.zeros(scores.shape, bool)
        scores = np.where(np.broadcast_to(allowed, scores.shape), scores, -np.inf)
    return scores
