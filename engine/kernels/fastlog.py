"""Vectorisable natural logarithm of float64, for the log-sum-exp of every query row.

Numba lost SVML, so ``math.log`` in a loop is one libm call per element: about 3% of a forward
task at (4, 8, 32, 64), where each task takes the log of 32 row sums (Intel Xeon, 2026-12).
:func:`fast_log` is fdlibm's ``__ieee754_log`` (Sun Microsystems, 1993; also musl's and FreeBSD's)
without its branches: x = 2^k * m with m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f / (2 + f), and
log(1 + f) = f - f^2 / 2 + s * (f^2 / 2 + R(s^2)) with fdlibm's degree-14 polynomial R (error
below 2^-58.45 on that range), the exponent's part split as k * ln2_hi + k * ln2_lo. Every step
is straight-line code with selects, so LLVM vectorises a loop over it.

Contract (``tests/kernels/test_fastlog.py``): within 1 ulp of ``np.log`` for positive finite
float64 (normal and subnormal), -inf at 0 (either sign), NaN for negative x and NaN, +inf at +inf.
"""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .fastexp import _bits_as_float

__all__ = ["fast_log", "log_array"]

_LN2_HI = 6.93147180369123816490e-01  # ln2's first 32 bits: k * _LN2_HI is exact for |k| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_LG = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)
_SQRT2 = 1.4142135623730951
_TINY = 2.2250738585072014e-308  # the smallest normal float64
_TWO54 = 18014398509481984.0


@intrinsic
def _float_bits(typingctx, x):
    """The int64 bits of a float64 (no conversion)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return types.int64(x), codegen


# not reassociated: fdlibm's order of operations is its accuracy; error_model="numpy": the
# division carries no zero check (which kept the loop scalar, 5 ns per element)
@njit(fastmath={"contract"}, error_model="numpy")
def fast_log(x):
    """log(x) of a float64 ``x`` (see the module for the contract)."""
    small = x < _TINY  # subnormal (or zero, negative, which the selects below replace)
    y = x * _TWO54 if small else x
    u = _float_bits(y)
    k = ((u >> 52) & 0x7FF) - 1023 - (54 if small else 0)
    m = _bits_as_float((u & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)  # in [1, 2)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    dk = np.float64(k + 1 if big else k)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG[1] + w * (_LG[3] + w * _LG[5]))
    t2 = z * (_LG[0] + w * (_LG[2] + w * (_LG[4] + w * _LG[6])))
    hfsq = 0.5 * f * f
    r = dk * _LN2_HI - ((hfsq - (s * (hfsq + t1 + t2) + dk * _LN2_LO)) - f)
    r = np.inf if x == np.inf else r
    r = -np.inf if x == 0.0 else r
    return r if x >= 0.0 else np.nan  # NaN and negative x


@njit(error_model="numpy")
def log_array(x, out):
    """``out[i] = fast_log(x[i])`` over 1-D float64 arrays (the tested entry point)."""
    for i in range(x.shape[0]):
        out[i] = fast_log(x[i])
