"""Vectorisable exp for non-positive arguments (numbers already shifted by a row maximum).

Numba lost SVML, so ``math.exp`` in a loop is a scalar libm call (~0.3 G/s here). These kernels
use the classic range reduction x = n*ln2 + r, |r| <= ln2/2, a polynomial for e^r, and 2^n built
from exponent bits, written as two plain loops that LLVM turns into SIMD code.

Contract (tested in ``tests/test_fastexp.py``): for x <= 0, relative error below 2e-7 (float32)
and 1e-15 (float64) wherever e^x is a normal number; exactly 0.0 for x = -inf and wherever e^x is
below the smallest normal (its true value there is < 1.2e-38 or 2.3e-308: negligible next to the
row maximum's own term, 1); NaN stays NaN.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from ..jit_cache import cache_enabled

_CACHE = cache_enabled()

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125          # ln2 split so n*_LN2_HI is exact
_LN2_LO = 1.42860682030941723212e-6


@njit(cache=_CACHE, inline="always", fastmath={"contract"})
def _exp_shifted_f32(x, shift, bits):
    """x[:] = exp(x[:] - shift) in float32; ``bits`` is an int32 scratch of at least len(x)."""
    n_el = x.shape[0]
    for j in range(n_el):
        t = x[j] - shift
        tc = t if t > np.float32(-87.3) else np.float32(-87.3)  # keeps the polynomial finite
        n = np.floor(tc * np.float32(_LOG2E) + np.float32(0.5))
        r = tc - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
        # degree-6 Taylor on |r| <= 0.347: truncation < 2.4e-8 relative
        p = np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        # underflow (and -inf) -> 0; NaN fails both comparisons and stays NaN
        x[j] = p if t > np.float32(-87.3) else (np.float32(0.0) if t <= np.float32(-87.3) else t)
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = bits[:n_el].view(np.float32)
    for j in range(n_el):
        x[j] *= scale[j]


@njit(cache=_CACHE, inline="always", fastmath={"contract"})
def _exp_shifted_f64(x, shift, bits):
    """x[:] = exp(x[:] - shift) in float64; ``bits`` is an int64 scratch of at least len(x)."""
    n_el = x.shape[0]
    for j in range(n_el):
        t = x[j] - shift
        tc = t if t > -708.0 else -708.0
        n = np.floor(tc * _LOG2E + 0.5)
        r = tc - n * _LN2_HI - n * _LN2_LO
        # degree-12 Taylor on |r| <= 0.347: truncation < 1e-17 relative
        p = 1.0 / 479001600
        p = p * r + 1.0 / 39916800
        p = p * r + 1.0 / 3628800
        p = p * r + 1.0 / 362880
        p = p * r + 1.0 / 40320
        p = p * r + 1.0 / 5040
        p = p * r + 1.0 / 720
        p = p * r + 1.0 / 120
        p = p * r + 1.0 / 24
        p = p * r + 1.0 / 6
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        x[j] = p if t > -708.0 else (0.0 if t <= -708.0 else t)
        bits[j] = (np.int64(n) + np.int64(1023)) << np.int64(52)
    scale = bits[:n_el].view(np.float64)
    for j in range(n_el):
        x[j] *= scale[j]


def exp_shifted(x, shift, bits):
    """x[:] = exp(x[:] - shift) in place, for use inside kernels (dispatches on x's dtype)."""
    x[:] = np.exp(x - shift)


@overload(exp_shifted, inline="always")
def _exp_shifted_overload(x, shift, bits):
    if x.dtype == types.float32:
        return lambda x, shift, bits: _exp_shifted_f32(x, shift, bits)
    if x.dtype == types.float64:
        return lambda x, shift, bits: _exp_shifted_f64(x, shift, bits)
    return None
