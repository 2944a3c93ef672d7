"""Vectorisable exp for non-positive arguments (numbers already shifted by a row maximum).

Numba lost SVML, so ``math.exp`` in a loop is a scalar libm call (~0.3 G/s here). ``fast_exp`` uses
the classic range reduction x = n*ln2 + r, |r| <= ln2/2, a polynomial for e^r, and 2^n built
from exponent bits by a bit cast (an LLVM ``bitcast``, so the whole function is branch-free
straight-line code that LLVM turns into SIMD when it is called inside a loop).

Contract (tested in ``tests/kernels/test_fastexp.py``): for x <= 0, relative error below 2.5e-7
(float32, about 2 ulp) and 1e-15 (float64) wherever e^x is a normal number; exactly 0.0 for
x = -inf and for x below ``_CUT_F32``/``_CUT_F64``, where e^x is below the smallest normal (its
true value there is < 1.2e-38 or 2.3e-308: negligible next to the row maximum's own term, 1); NaN
stays NaN. Positive x is outside the contract.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["fast_exp", "softmax_exp", "fast_tanh", "exp_array", "softmax_exp_array"]

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln2 split so n*_LN2_HI is exact
_LN2_LO = 1.42860682030941723212e-6
# largest floats whose exp is below the smallest normal (exp(t) for t < these underflows to 0)
_CUT_F32 = -87.3365478515625
_CUT_F64 = -708.3964185322642


@intrinsic
def _bits_as_float(typingctx, i):
    """Reinterpret int32 bits as float32, int64 bits as float64 (no conversion)."""
    if i == types.int32:
        ret = types.float32
    elif i == types.int64:
        ret = types.float64
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(ret))

    return ret(i), codegen


@njit(fastmath={"contract"})
def _exp_f32(t):
    # below the cut (and -inf, NaN) evaluate at 0, whose result the select below discards: at the
    # cut itself the product can round just under the smallest normal, and a subnormal result
    # costs a microcode assist per lane (2.5x on a row of masked scores, measured)
    tc = t if t >= np.float32(_CUT_F32) else np.float32(0.0)
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
    p = p * _bits_as_float(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    # underflow (and -inf) -> 0; NaN fails both comparisons and stays NaN
    return p if t >= np.float32(_CUT_F32) else (np.float32(0.0) if t < np.float32(_CUT_F32) else t)


@njit(fastmath={"contract"})
def _exp_f64(t):
    tc = t if t >= _CUT_F64 else 0.0  # as in _exp_f32: no subnormal intermediate
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
    p = p * _bits_as_float(np.int64((np.int64(n) + np.int64(1023)) << np.int64(52)))
    return p if t >= _CUT_F64 else (0.0 if t < _CUT_F64 else t)


@intrinsic
def _mantissa_to_exponent(typingctx, z):
    """The float whose bits are ``z``'s bits shifted left by its mantissa width (23 or 52): the
    integer in ``z``'s low mantissa bits becomes the exponent field. A plain LLVM ``shl``: the
    high bits shifted out are dropped (a Numba integer shift could assume they are not)."""
    if z not in (types.float32, types.float64):
        return None
    width, shift = (32, 23) if z == types.float32 else (64, 52)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], ir.IntType(width))
        return builder.bitcast(builder.shl(bits, ir.Constant(ir.IntType(width), shift)), args[0].type)

    return z(z), codegen


# softmax_exp: the floor of the range reduction by rounding in a float's mantissa (adding 1.5 * 2^23
# rounds to an integer, which then sits in the low bits), the bias folded into that constant, so
# 2^n is one shift of those bits; the clamp below makes n = -127 (-1023), whose 2^n is +0.0 exactly
_SMX_MAGIC_F32 = 12582912.0 + 127.0
_SMX_MAGIC_F64 = 6755399441055744.0 + 1023.0
_SMX_CUT_F32 = -88.0
_SMX_CUT_F64 = -709.0


@njit(fastmath={"contract"})
def _softmax_exp_f32(t):
    tc = np.float32(_SMX_CUT_F32) if np.float32(_SMX_CUT_F32) > t else t  # one max; NaN passes
    z = tc * np.float32(_LOG2E) + np.float32(_SMX_MAGIC_F32)
    n = z - np.float32(_SMX_MAGIC_F32)
    r = tc - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
    p = np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _mantissa_to_exponent(z)


@njit(fastmath={"contract"})
def _softmax_exp_f64(t):
    tc = _SMX_CUT_F64 if _SMX_CUT_F64 > t else t
    z = tc * _LOG2E + _SMX_MAGIC_F64
    n = z - _SMX_MAGIC_F64
    r = tc - n * _LN2_HI - n * _LN2_LO
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
    return p * _mantissa_to_exponent(z)


def fast_exp(t):
    """``exp(t)`` of a float32 or float64 scalar ``t <= 0`` inside Numba kernels and mods, in t's
    dtype, as a polynomial that LLVM vectorises (Numba has no SVML: ``math.exp`` in a loop stays a
    scalar libm call). Relative error a few units in the last place (Cody-Waite range reduction
    and a Taylor polynomial); below the underflow cut the result is 0, NaN stays NaN. In plain
    Python it is ``np.exp``. Positive ``t`` is outside the contract.

    :param t: the exponent, a float32 or float64 scalar, at most 0.
    :type t: float
    :return: ``exp(t)`` in ``t``'s dtype.
    """
    return np.exp(t)


def softmax_exp(t):
    """exp(t) for the weights of a softmax, inside kernels: t <= 88 (float32; 709 float64), as
    :func:`fast_exp` where e^t is a normal number (the same reduction and polynomial); below that
    either 0 or a value within the smallest normal of e^t (exact 0 for t = -inf and t <= -88,
    -709); NaN stays NaN; t above the bound gives garbage (the softmax kernels never pass one:
    their shift keeps t <= ``softmax_tile.STALE_MAX_MARGIN``). About 14 vector operations per
    lane group against fast_exp's 19: the rounding is done by adding a constant, the clamp is
    one max and there is no select afterwards."""
    return np.exp(t)


@overload(softmax_exp, target="cpu")
def _softmax_exp_overload(t):
    if t == types.float32:
        return lambda t: _softmax_exp_f32(t)
    if t == types.float64:
        return lambda t: _softmax_exp_f64(t)
    return None


@overload(fast_exp, target="cpu")  # the cuda kernels register their own (libdevice)
def _fast_exp_overload(t):
    if t == types.float32:
        return lambda t: _exp_f32(t)
    if t == types.float64:
        return lambda t: _exp_f64(t)
    return None


def fast_tanh(x):
    """tanh(x) of a float32/float64 scalar. In Python it is ``math.tanh`` (exact: the reference
    backend's oracle); inside kernels a vectorisable formula, relative error below 1e-6 (float32)
    and 1e-14 (float64): an odd Taylor polynomial near 0, else (1 - t) / (1 + t) with
    t = exp(-2|x|) from ``fast_exp`` (libm's tanh is a scalar call, ~10x slower in a loop).

    :param x: a float32 or float64 scalar.
    :type x: float
    :return: ``tanh(x)`` in ``x``'s dtype.
    """
    return math.tanh(x)


@overload(fast_tanh, target="cpu")
def _fast_tanh_overload(x):
    if x not in (types.float32, types.float64):
        return None
    f = np.float32 if x == types.float32 else np.float64
    # the Taylor branch's truncation (~0.009 x^10) must stay below the dtype's precision, and the
    # other branch's cancellation in 1 - t (amplifying t's error by 1/(1 - t)) moderate
    one, two, small_limit = f(1.0), f(-2.0), f(0.25 if x == types.float32 else 0.02)
    c3, c5, c7, c9 = f(-1.0 / 3.0), f(2.0 / 15.0), f(-17.0 / 315.0), f(62.0 / 2835.0)

    def impl(x):
        a = abs(x)
        t = fast_exp(two * a)
        big = (one - t) / (one + t)
        x2 = x * x
        small = a * (one + x2 * (c3 + x2 * (c5 + x2 * (c7 + x2 * c9))))  # error ~ 0.009 x^10
        r = small if a < small_limit else big
        return r if x >= 0 else -r  # NaN: both branches give NaN

    return impl


@njit(fastmath={"contract"})
def exp_array(x, out):
    """out[i] = fast_exp(x[i]) over 1-D arrays: the tested entry point of the contract."""
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


@njit(fastmath={"contract"})
def softmax_exp_array(x, out):
    """out[i] = softmax_exp(x[i]) over 1-D arrays: the tested entry point of its contract."""
    for i in range(x.shape[0]):
        out[i] = softmax_exp(x[i])
