"""Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): the
counter-based random stream behind attention dropout.

A counter-based generator is a pure function ``(counter, key) -> 4 random 32-bit words``: no state
is carried from one draw to the next, so the forward can draw the keep/drop decision of element
``(b, h, i, j)`` in any order, on any tile, on any thread, and the backward regenerates exactly the
same decision instead of storing an L x S mask (FlashAttention and torch's CUDA dropout do the
same, with the same generator). Checked against the Random123 known-answer vectors in
``tests/backward/test_dropout.py``.

Layout of the dropout stream (:func:`keep_scale`): key = the 64-bit seed (low word, high word);
counter = ``(j // 4, i, h, b)``, and word ``j % 4`` of the result decides element ``(b, h, i, j)``
(one generator call serves four neighbouring keys). The element is dropped when that word is below
``threshold = round(p * 2**32)``, so it is kept with probability ``1 - p`` (to within 2**-32).

Two implementations of the same function: ``philox4x32`` compiled by Numba for the kernels, and
``philox4x32_numpy`` over NumPy arrays for the ``reference`` backend and the tests.
"""

import numpy as np
from numba import njit

from ..runtime.jit_cache import cache_enabled

__all__ = ["philox4x32", "philox4x32_numpy", "keep_scale", "keep_mask_numpy", "dropout_threshold", "split_seed"]

_CACHE = cache_enabled()

# the generator's constants (Random123's PHILOX_M4x32_0/1 and PHILOX_W32_0/1)
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10


@njit(cache=_CACHE)
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the counter ``(c0, c1, c2, c3)`` under the key ``(k0, k1)``: four words.

    Every argument is a uint64 holding a 32-bit value; so is every result.
    """
    m0 = np.uint64(_M0)
    m1 = np.uint64(_M1)
    w0 = np.uint64(_W0)
    w1 = np.uint64(_W1)
    mask = np.uint64(_MASK32)
    shift = np.uint64(32)
    for _ in range(_ROUNDS):
        p0 = m0 * c0  # 32 x 32 -> 64 bits: exact in a uint64
        p1 = m1 * c2
        n0 = ((p1 >> shift) ^ c1 ^ k0) & mask
        n1 = p1 & mask
        n2 = ((p0 >> shift) ^ c3 ^ k1) & mask
        n3 = p0 & mask
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + w0) & mask
        k1 = (k1 + w1) & mask
    return c0, c1, c2, c3


def philox4x32_numpy(c0, c1, c2, c3, k0, k1):
    """:func:`philox4x32` over NumPy arrays (broadcast together): four uint64 arrays of words."""
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = np.broadcast_arrays(*c)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    for _ in range(_ROUNDS):
        p0 = np.uint64(_M0) * c0
        p1 = np.uint64(_M1) * c2
        c0, c1, c2, c3 = ((p1 >> shift) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> shift) ^ c3 ^ k1) & mask, p0 & mask
        k0 = (k0 + np.uint64(_W0)) & mask
        k1 = (k1 + np.uint64(_W1)) & mask
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The 32-bit threshold below which an element is dropped: round(p * 2**32), in 0 ... 2**32."""
    return int(round(float(p) * 2.0**32))


def split_seed(seed: int) -> tuple[int, int]:
    """The generator's key words (low, high) of a 64-bit seed."""
    return seed & _MASK32, (seed >> 32) & _MASK32


@njit(cache=_CACHE)
def keep_scale(seed_lo, seed_hi, b, h, i0, nq, j0, nk, threshold, scale, zt):
    """``zt[c, r] = scale`` where element ``(b, h, i0 + r, j0 + c)`` is kept, else 0.

    ``zt`` is a (>= nk, >= nq) array in the transposed tile layout of the kernels (keys along the
    rows); ``threshold`` a uint64 from :func:`dropout_threshold`; ``scale`` is 1 / (1 - p) in the
    kernel's dtype. One generator call per four keys.
    """
    zero = scale - scale
    k0 = np.uint64(seed_lo)
    k1 = np.uint64(seed_hi)
    cb = np.uint64(b)
    ch = np.uint64(h)
    j1 = j0 + nk
    g0 = j0 // 4
    g1 = (j1 + 3) // 4
    for r in range(nq):
        ci = np.uint64(i0 + r)
        for g in range(g0, g1):
            w0, w1, w2, w3 = philox4x32(np.uint64(g), ci, ch, cb, k0, k1)
            base = 4 * g
            if base >= j0 and base < j1:
                zt[base - j0, r] = scale if w0 >= threshold else zero
            if base + 1 >= j0 and base + 1 < j1:
                zt[base + 1 - j0, r] = scale if w1 >= threshold else zero
            if base + 2 >= j0 and base + 2 < j1:
                zt[base + 2 - j0, r] = scale if w2 >= threshold else zero
            if base + 3 >= j0 and base + 3 < j1:
                zt[base + 3 - j0, r] = scale if w3 >= threshold else zero


def keep_mask_numpy(seed: int, p: float, B: int, H: int, L: int, S: int) -> np.ndarray:
    """The (B, H, L, S) boolean keep mask of the dropout stream (True = kept): the oracle's copy.

    Memory is O(B H L S): for tests and the ``reference`` backend.
    """
    k0, k1 = split_seed(seed)
    threshold = np.uint64(min(dropout_threshold(p), 2**32))
    b, h, i, g = np.meshgrid(
        np.arange(B, dtype=np.uint64),
        np.arange(H, dtype=np.uint64),
        np.arange(L, dtype=np.uint64),
        np.arange((S + 3) // 4, dtype=np.uint64),
        indexing="ij",
        sparse=True,
    )
    words = philox4x32_numpy(g, i, h, b, k0, k1)
    stacked = np.stack(words, axis=-1).reshape(B, H, L, -1)[..., :S]  # word j % 4 of group j // 4
    return stacked >= threshold
