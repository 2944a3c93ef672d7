"""Operations on one tile shared by the ``cpu`` kernels: the fastmath flags they compile with, and
the two tile products with their 16-bit variants (float operands through ``tile_gemm``; float16 or
bfloat16 bits through a mixed-precision GEMM, ``tile_gemm_16``)."""

import numpy as np
from numba import types as nb_types
from numba.extending import overload

from .gemm import GEMM_CBLAS_F16, tile_gemm, tile_gemm_16
from .half import f32_to_bf16_bits, f32_to_f16_bits
from .nonfinite import redo_if_nonfinite

__all__ = ["_FM", "_scaled_q", "_score_scale", "_half_buffer", "_scores_gemm", "_values_gemm"]

# reassoc/contract only: no nnan/ninf, NaN and -inf carry meaning here (NaN rows, masked keys)
_FM = {"contract", "reassoc", "nsz", "arcp"}


# 16-bit operands (uint16 bit patterns of bfloat16 or float16) take the mixed-precision GEMM path:
# q is copied unscaled (exact), the scale is applied to the float32 scores, and the probabilities
# are rounded to the operand format for the second product (as FlashAttention does). These helpers
# are the only places the two paths differ; each compiles to one branch for the operand type.


def _scaled_q(x, scale):
    """What the q tile holds: ``scale * x`` for float operands, the raw bits for 16-bit ones."""


@overload(_scaled_q, inline="always")
def _scaled_q_impl(x, scale):
    if isinstance(x, nb_types.Integer):
        return lambda x, scale: x
    return lambda x, scale: x * scale


def _score_scale(q, scale):
    """The factor still to apply to the scores after the first product (1 for float operands)."""


@overload(_score_scale, inline="always")
def _score_scale_impl(q, scale):
    if isinstance(q.dtype, nb_types.Integer):
        return lambda q, scale: scale
    return lambda q, scale: 1.0


def _half_buffer(q, n):
    """Scratch for the 16-bit probabilities (empty for float operands)."""


@overload(_half_buffer, inline="always")
def _half_buffer_impl(q, n):
    if isinstance(q.dtype, nb_types.Integer):
        return lambda q, n: np.empty(n, dtype=np.uint16)
    return lambda q, n: np.empty(0, dtype=q.dtype)


def _scores_gemm(kind, fn, kt, qt, st):
    """st = kt @ qt."""


@overload(_scores_gemm, inline="always")
def _scores_gemm_impl(kind, fn, kt, qt, st):
    if isinstance(kt.dtype, nb_types.Integer):
        return lambda kind, fn, kt, qt, st: tile_gemm_16(fn, kt, qt, st)
    return lambda kind, fn, kt, qt, st: tile_gemm(kind, fn, kt, qt, st)


def _values_gemm(kind, fn, st, half, vt, pv):
    """pv = st.T @ vt (st rounded into ``half`` first for 16-bit operands, whose values the wrapper
    checked finite; float products with a NaN/inf are redone exactly: ``kernels.nonfinite``)."""


@overload(_values_gemm, inline="always")
def _values_gemm_impl(kind, fn, st, half, vt, pv):
    if isinstance(vt.dtype, nb_types.Integer):

        def impl(kind, fn, st, half, vt, pv):
            nk, nq = st.shape
            p = half[: nk * nq].reshape((nk, nq))
            if kind == GEMM_CBLAS_F16:
                for c in range(nk):
                    for r in range(nq):
                        p[c, r] = f32_to_f16_bits(st[c, r])
            else:
                for c in range(nk):
                    for r in range(nq):
                        p[c, r] = f32_to_bf16_bits(st[c, r])
            tile_gemm_16(fn, p.T, vt, pv)

        return impl

    def impl(kind, fn, st, half, vt, pv):
        tile_gemm(kind, fn, st.T, vt, pv)
        redo_if_nonfinite(st.T, vt, pv)  # a NaN/inf value reaches only rows that weigh it

    return impl
