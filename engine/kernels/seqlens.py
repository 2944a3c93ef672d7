"""Checking and extending ``cache_seqlens`` in one compiled pass (decoding): a NumPy comparison,
``nonzero``, ``max`` and ``sum`` over a few entries cost about a microsecond each, a decode
step's whole budget for them."""

import numpy as np
from numba import njit

from ..runtime.jit_cache import cache_enabled

_CACHE = cache_enabled()

__all__ = ["_check_seqlens", "_checked_seqlens_k", "_seqlens_k"]


@njit(cache=_CACHE)
def _check_seqlens(cache_seqlens, L_new, capacity, out):
    """``out[b] = cache_seqlens[b]`` (int64); returns the largest ``cache_seqlens[b] + L_new``, or
    -1 when some entry is negative or leaves no room for ``L_new`` new keys in ``capacity`` (the
    full validation then names it)."""
    most = 0
    for b in range(cache_seqlens.shape[0]):
        s = np.int64(cache_seqlens[b])  # (uint64 + int64 would be a float in Numba)
        if s < 0 or s > capacity - L_new:  # (s + L_new could wrap past int64's largest)
            return -1
        out[b] = s
        most = max(most, s + L_new)
    return most


@njit(cache=_CACHE)
def _checked_seqlens_k(cache_seqlens, L_new, capacity, out):
    """``out[b] = cache_seqlens[b] + L_new`` (int64): sequence b's keys after the write; returns
    ``(max, sum)`` of ``out``, or ``(-1, 0)`` when some entry is negative or leaves no room for
    ``L_new`` new keys in ``capacity`` (the full validation then names it)."""
    most = 0
    total = 0
    for b in range(cache_seqlens.shape[0]):
        s = np.int64(cache_seqlens[b])
        if s < 0 or s > capacity - L_new:  # (s + L_new could wrap past int64's largest)
            return -1, 0
        out[b] = s + L_new
        most = max(most, s + L_new)
        total += s + L_new
    return most, total


@njit(cache=_CACHE)
def _seqlens_k(cache_seqlens, L_new, out):
    """``out = cache_seqlens + L_new``; returns ``(max, sum)`` of ``out``."""
    most = 0
    total = 0
    for b in range(cache_seqlens.shape[0]):
        n = cache_seqlens[b] + L_new
        out[b] = n
        most = max(most, n)
        total += n
    return most, total
