"""The online softmax's work on one transposed score tile ``st`` (keys along the rows, queries along
the columns) of the ``cpu`` forward kernel, as few passes over it as the scores allow.

The running maximum ``m`` of each query row is the shift of its exponentials. FlashAttention
rescales the accumulated output whenever a new tile raises ``m``; that takes a pass over the tile
for its maximum before the exponentials, and a rescale of the accumulator. Here (as FlashAttention-4
does on GPUs) the shift stays where it is while the tile's scores exceed it by at most
:data:`STALE_MAX_MARGIN`: the weights are then at most ``exp(margin)`` (2981), which float32,
float16 (largest 65504) and the float64 sums hold with the same relative precision, and the
output and the log-sum-exp are the same quotient and the same sum. So a tile costs one pass
(:func:`exp_tile`: the exponential, the row sums and the row maxima together) and no rescale; only
when a tile's maximum exceeds the shift by more than the margin (in practice the first tiles of a
row) is the pass redone with the new maximum and the accumulator rescaled. A row that has seen no
visible score yet (shift ``-inf``) takes the maximum first (:func:`column_max`).

The 16-bit path's pass (:func:`exp_tile_bf16`, :func:`exp_tile_f16`) writes the probabilities
rounded to the operands' format in the same pass, and computes them as powers of two
(:func:`exp2_16`): its scale and shifts are multiplied by log2(e) once per tile and per row, which
saves the two-step reduction by ln 2 and a polynomial degree at the same accuracy.
"""

import math

import numpy as np
from numba import njit

from ..fastexp import _mantissa_to_exponent, softmax_exp
from .fastmath import _FM
from .half import f32_to_bf16_bits_ftz, f32_to_f16_bits
from .vector_width import wide_vectors

__all__ = [
    "STALE_MAX_MARGIN",
    "SUM_CHUNK",
    "LOG2E",
    "column_max",
    "exp2_16",
    "exp_tile",
    "exp_tile_bf16",
    "exp_tile_f16",
    "exp_tile_bf16_pairs",
    "exp_tile_f16_pairs",
    "all_finite",
    "all_finite_flat",
]

#: how far (natural log) a score may exceed its row's shift before the shift moves up
STALE_MAX_MARGIN = 8.0
#: keys per partial row sum in the tile's dtype; the partial sums are added in float64 (a float32
#: sum over a whole tile would lose about sqrt(block_k) ulps, which the lse and the backward's
#: weights inherit). Even: the exponentials run over two key rows per sweep
SUM_CHUNK = 32
#: log2(e): the 16-bit pass computes its exponentials as powers of two (see :func:`exp2_16`)
LOG2E = 1.4426950408889634

# exp2_16: 2^t = 2^n * 2^f with n = round(t) (by adding a constant that rounds in the mantissa, as
# fastexp.softmax_exp; the bias folded in, so 2^n is a shift of z's bits) and f = t - n in
# [-0.5, 0.5] exactly; 2^f by a degree-5 polynomial fitted for relative error (iteratively
# reweighted least squares on 20001 points, the near-minimax fit): 7.6e-8 in exact arithmetic, 2.3e-7
# evaluated in float32. The clamp at -127 makes n = -127, whose 2^n is +0.0 exactly
_E2_MAGIC = 12582912.0 + 127.0
_E2_CUT = -127.0
_E2_C = (
    1.0000001192092896,
    0.6931469440460205,
    0.24022120237350464,
    0.05550713464617729,
    0.00967549066990614,
    0.001327630365267396,
)


@njit(fastmath=_FM, error_model="numpy", inline="always")
def column_max(st, tm):
    """``tm[r]`` = the largest ``st[c, r]`` over the tile's rows (NaN where a NaN is): NumPy's
    ``maximum`` loop over whole rows, which vectorises (a per-element select into ``tm`` did not)."""
    tm[:] = -np.inf
    for c in range(st.shape[0]):
        np.maximum(tm, st[c], tm)


@njit(fastmath={"contract"})  # not inlined by Numba: its rounding steps keep these flags
def exp2_16(t):
    """2^t of a float32 ``t`` <= 127, for the probabilities of the 16-bit path: relative error
    below 3e-7 where 2^t is a normal float32 (as :func:`~engine.kernels.fastexp.softmax_exp`'s
    2.5e-7), 0 or within the smallest normal below that (exact 0 for -inf), NaN for NaN. Twelve
    vector operations per lane group with the scaling FMA, against fifteen for ``softmax_exp``
    of a natural exponent: no two-step reduction by ln 2 (the exponent arrives in base 2, the
    pass's scale and shift multiplied by log2(e)) and one degree fewer (the range is [-0.5, 0.5]
    of a base-2 exponent)."""
    tc = np.float32(_E2_CUT) if np.float32(_E2_CUT) > t else t  # one max; NaN passes
    z = tc + np.float32(_E2_MAGIC)
    f = tc - (z - np.float32(_E2_MAGIC))
    p = np.float32(_E2_C[5])
    p = p * f + np.float32(_E2_C[4])
    p = p * f + np.float32(_E2_C[3])
    p = p * f + np.float32(_E2_C[2])
    p = p * f + np.float32(_E2_C[1])
    p = p * f + np.float32(_E2_C[0])
    return p * _mantissa_to_exponent(z)


@njit(inline="always")
def _natural(t):
    return softmax_exp(t)


def _exp_tile_storing(store, exp_of=_natural, units=1.0, pairs=False):
    """:func:`exp_tile` with ``store`` compiled in (a function passed as an argument would make
    the kernel uncacheable), and its exponential: ``exp_of`` of the exponent times ``units``
    (``softmax_exp`` and 1, or :func:`exp2_16` and log2(e), whose product with the scale and the
    shift is made once per tile and per row). ``pairs``: ``out`` is uint32 (ceil(nk / 2), nq),
    key rows 2i and 2i + 1 stored in the low and high half of row i (the pair layout of AMX's
    right operand, ``kernels.cpu.amx``; an odd last row paired with 0). ``shift`` holds
    unscaled scores (a row's largest so far) and the exponent is ``(st - shift) * scale``, exactly 0
    at that score whatever its size: the 16-bit passes' second product reads the weights rounded,
    so the largest weight must be exactly the one the row's sum counts (or a one-hot row's output
    is a 16-bit step off at scores above about 1e4); and a shift scaled and rounded to float32
    would pass exp's range at scaled scores above about 1.5e9 (see :data:`exp_tile`)."""

    @njit(fastmath=_FM, error_model="numpy", inline="always")  # per element: inlined, so it vectorises
    def weight(a, shift_r, scale_u, u):
        """One score's exponential: ``exp((a - shift_r) * scale)`` (times ``units``)."""
        return exp_of((a - shift_r) * scale_u)

    @njit(fastmath=_FM, error_model="numpy")
    def exp_tile(st, out, scale, shift, ts, tc, tmx):
        """One pass over ``st`` (nk, nq): ``out[c, r] = store(exp((st[c, r] - shift[r]) * scale))``,
        ``ts[r]`` (float64) = the sum over c of those exponentials before ``store``, ``tmx[r]`` = the
        largest ``st[c, r]`` (unscaled; NaN ignored: a NaN score makes its row's sum NaN anyway).

        ``store`` rounds into the output's format: the identity for float (:func:`exp_tile`), a
        16-bit rounding for the 16-bit path's uint16 probabilities (:func:`exp_tile_bf16`,
        :func:`exp_tile_f16`). ``tc`` (nq,) is scratch for the partial sums (see
        :data:`SUM_CHUNK`). Two key rows per sweep: two independent polynomial chains.
        """
        wide_vectors()
        nk, nq = st.shape
        zero = tc.dtype.type(0)
        u = tc.dtype.type(units)
        scale_u = scale * u
        for r in range(nq):
            ts[r] = 0.0
            tmx[r] = -np.inf
        for c0 in range(0, nk, SUM_CHUNK):
            c1 = min(c0 + SUM_CHUNK, nk)
            tc[:nq] = zero
            for c in range(c0, c1 - 1, 2):
                s0 = st[c]
                s1 = st[c + 1]
                if pairs:
                    o = out[c // 2]
                    for r in range(nq):
                        a = s0[r]
                        b = s1[r]
                        p0 = weight(a, shift[r], scale_u, u)
                        p1 = weight(b, shift[r], scale_u, u)
                        o[r] = np.uint32(store(p0)) | (np.uint32(store(p1)) << np.uint32(16))
                        tc[r] += p0 + p1
                        ab = a if a > b else b
                        tmx[r] = ab if ab > tmx[r] else tmx[r]
                else:
                    o0 = out[c]
                    o1 = out[c + 1]
                    for r in range(nq):
                        a = s0[r]
                        b = s1[r]
                        p0 = weight(a, shift[r], scale_u, u)
                        p1 = weight(b, shift[r], scale_u, u)
                        o0[r] = store(p0)
                        o1[r] = store(p1)
                        tc[r] += p0 + p1
                        ab = a if a > b else b
                        tmx[r] = ab if ab > tmx[r] else tmx[r]
            if (c1 - c0) % 2:
                s0 = st[c1 - 1]
                o0 = out[(c1 - 1) // 2] if pairs else out[c1 - 1]
                for r in range(nq):
                    a = s0[r]
                    p0 = weight(a, shift[r], scale_u, u)
                    o0[r] = store(p0)
                    tc[r] += p0
                    tmx[r] = a if a > tmx[r] else tmx[r]
            for r in range(nq):
                ts[r] += tc[r]

    return exp_tile


@njit(inline="always")
def _same(x):
    return x


@njit(inline="always")
def _to_f16(x):
    return f32_to_f16_bits(x)


@njit(inline="always")
def _to_bf16(x):  # the probabilities: a subnormal one may become 0 (the row's largest is >= 1)
    return f32_to_bf16_bits_ftz(x)


#: the pass for float probabilities, and for 16-bit ones rounded to bfloat16 / float16.
# The exponent (score - the row's unscaled largest) * scale, exactly 0 at that score. As one
# FMA against a scaled shift rounded to float32 the rounding (half a step of the largest scaled
# score) is common to the row and cancels, until it passes exp's range: above about 1.5e9 every
# weight of a row underflowed to 0 (a scale of 1e8 on unit inputs; docs/reliability.md)
exp_tile = _exp_tile_storing(_same)
exp_tile_bf16 = _exp_tile_storing(_to_bf16, exp2_16, LOG2E)
exp_tile_f16 = _exp_tile_storing(_to_f16, exp2_16, LOG2E)
#: the same, the probabilities in AMX's pair layout (``kernels.cpu.amx``)
exp_tile_bf16_pairs = _exp_tile_storing(_to_bf16, exp2_16, LOG2E, pairs=True)
exp_tile_f16_pairs = _exp_tile_storing(_to_f16, exp2_16, LOG2E, pairs=True)


@njit(fastmath=_FM, error_model="numpy", inline="always")
def all_finite(x):
    """Whether every entry of the 2-D array ``x`` is finite."""
    finite = True
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            finite &= math.isfinite(x[i, j])
    return finite


@njit(fastmath=_FM, error_model="numpy", inline="always")
def all_finite_flat(x):
    """Whether every entry of the 1-D array ``x`` is finite."""
    finite = True
    for i in range(x.shape[0]):
        finite &= math.isfinite(x[i])
    return finite
