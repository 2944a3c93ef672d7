"""Operations on one tile of the ``cpu`` forward kernel that differ between float operands and 16-bit
ones (float operands through ``tile_gemm``; float16 or bfloat16 bits through a mixed-precision
GEMM, ``tile_gemm_16``): each is one overload that compiles to the one branch of its operand type.
The AMX path's own steps are in ``amx_steps``.

The overloads are called per tile, not per element, so they are plain calls (LLVM may still inline
them), not inlined into the task by Numba (``inline="always"``): each such inlining re-types the
task, and the float32 task's cold compile took 11.3 s with them against 9.7 s without on Zen 4,
at the same speed.
The fastmath flags of every ``cpu`` kernel are re-exported here (``_FM``)."""

import math

import numpy as np
from numba import njit
from numba import types as nb_types
from numba.extending import overload

from ..fastlog import fast_log
from .borrow import flat, readonly_like
from .fastmath import _FM
from .gemm import (
    GEMM_AMX_BF16,
    GEMM_AMX_F16,
    GEMM_CBLAS_F16,
    tile_gemm,
    tile_gemm_16,
    tile_gemm_16_acc,
    tile_gemm_acc,
)
from .half import f32_to_bf16_bits, f32_to_f16_bits
from .softmax_tile import (
    all_finite,
    all_finite_flat,
    exp_tile,
    exp_tile_bf16,
    exp_tile_bf16_pairs,
    exp_tile_f16,
    exp_tile_f16_pairs,
)

__all__ = [
    "_FM",
    "_aligned_empty",
    "_half_buffer",
    "_line",
    "_scores_gemm",
    "_exp_into",
    "_apply_dropout",
    "_values_finite",
    "_values_gemm_acc",
    "_finite_values",
    "_add_nonfinite",
    "_finish_rows",
]


# 16-bit operands (uint16 bit patterns of bfloat16 or float16) take the mixed-precision GEMM path:
# the scores are float32, and the probabilities are rounded to the operand format for the second
# product (as FlashAttention does). These helpers are the only places the two paths differ; each
# compiles to one branch for the operand type.


@njit(inline="always")
def _line(n):
    """``n`` rounded up to a multiple of 16 (a 64-byte line of float32): where scratch cut from
    one allocation starts each segment."""
    return (n + 15) // 16 * 16


#: the alignment of the tiles' scratch, in bytes: a cache line
_ALIGN = 64


@njit(inline="always")
def _aligned_empty(n, dtype):
    """``np.empty(n, dtype)`` whose first element starts a 64-byte cache line (NumPy's and Numba's
    allocators align to 16 or 32 bytes). Why: a GEMM writing a C matrix whose rows straddle cache
    lines runs much slower; MKL's AMX bfloat16 GEMM took 22.5 us instead of 13-14 for a 256 x 256
    x 64 score tile (one thread, Intel Xeon with AMX), about 15% of a bfloat16 call at L = 4096."""
    raw = np.empty(n + _ALIGN, dtype)  # _ALIGN elements: at least _ALIGN bytes of slack
    off = (_ALIGN - raw.ctypes.data % _ALIGN) % _ALIGN // raw.itemsize
    return raw[off : off + n]


def _half_buffer(q, n):
    """Scratch for the 16-bit probabilities (empty for float operands), 64-byte aligned."""


@overload(_half_buffer)
def _half_buffer_impl(q, n):
    if isinstance(q.dtype, nb_types.Integer):
        return lambda q, n: _aligned_empty(n, np.uint16)
    return lambda q, n: np.empty(0, dtype=q.dtype)


def _scores_gemm(kind, fn, kt, qt, st):
    """st = kt @ qt."""


@overload(_scores_gemm)
def _scores_gemm_impl(kind, fn, kt, qt, st):
    if isinstance(kt.dtype, nb_types.Integer):
        return lambda kind, fn, kt, qt, st: tile_gemm_16(fn, kt, qt, st)
    return lambda kind, fn, kt, qt, st: tile_gemm(kind, fn, kt, qt, st)


def _exp_into(kind, dropping, st, pt, half, scale, shift_raw, ts, tc, tmx):
    """The softmax pass over ``st`` (``softmax_tile.exp_tile``) into the probabilities the second
    product reads: float ``pt``, or for 16-bit operands ``half`` rounded to the operand format in
    the same pass (into float ``pt`` when ``dropping``: the dropout multiplies before rounding).
    ``shift_raw``: the rows' shifts, unscaled (each row's largest score so far)."""


@overload(_exp_into)
def _exp_into_impl(kind, dropping, st, pt, half, scale, shift_raw, ts, tc, tmx):
    if isinstance(half.dtype, nb_types.Integer):

        def impl(kind, dropping, st, pt, half, scale, shift_raw, ts, tc, tmx):
            nk, nq = st.shape
            if dropping:
                exp_tile(st, pt, scale, shift_raw, ts, tc, tmx)
            elif kind == GEMM_AMX_BF16 or kind == GEMM_AMX_F16:  # pairs of key rows (kernels.cpu.amx)
                pairs = half.view(np.uint32)[: (nk + 1) // 2 * nq].reshape(((nk + 1) // 2, nq))
                if kind == GEMM_AMX_F16:
                    exp_tile_f16_pairs(st, pairs, scale, shift_raw, ts, tc, tmx)
                else:
                    exp_tile_bf16_pairs(st, pairs, scale, shift_raw, ts, tc, tmx)
            elif kind == GEMM_CBLAS_F16:
                exp_tile_f16(st, half[: nk * nq].reshape((nk, nq)), scale, shift_raw, ts, tc, tmx)
            else:
                exp_tile_bf16(st, half[: nk * nq].reshape((nk, nq)), scale, shift_raw, ts, tc, tmx)

        return impl
    return lambda kind, dropping, st, pt, half, scale, shift_raw, ts, tc, tmx: exp_tile(
        st, pt, scale, shift_raw, ts, tc, tmx
    )


def _apply_dropout(kind, pt, zt, half):
    """``pt *= zt`` (the dropout's keep-and-scale factors), then for 16-bit operands ``pt`` rounded
    into ``half``."""


@njit(fastmath=_FM, inline="always")
def _times(pt, zt):
    for c in range(pt.shape[0]):
        for r in range(pt.shape[1]):
            pt[c, r] *= zt[c, r]


@overload(_apply_dropout)
def _apply_dropout_impl(kind, pt, zt, half):
    if isinstance(half.dtype, nb_types.Integer):

        def impl(kind, pt, zt, half):
            _times(pt, zt)
            nk, nq = pt.shape
            p = half[: nk * nq].reshape((nk, nq))
            if kind == GEMM_CBLAS_F16:
                for c in range(nk):
                    for r in range(nq):
                        p[c, r] = f32_to_f16_bits(pt[c, r])
            else:
                for c in range(nk):
                    for r in range(nq):
                        p[c, r] = f32_to_bf16_bits(pt[c, r])

        return impl
    return lambda kind, pt, zt, half: _times(pt, zt)


def _values_finite(vt):
    """Whether a value tile is finite (16-bit values: always; the wrapper checked them)."""


@overload(_values_finite)
def _values_finite_impl(vt):
    if isinstance(vt.dtype, nb_types.Integer):
        return lambda vt: True
    if vt.layout == "C":  # as one long loop (one short loop per row cost 4% of a 32 x 32 task)
        return lambda vt: all_finite_flat(flat(vt))
    return lambda vt: all_finite(vt)


def _values_gemm_acc(kind, fn, pt, half, vt, acc):
    """``acc += P.T @ vt`` for the tile's probabilities P (``pt`` (nk, nq), or ``half`` for 16-bit
    operands), in the GEMM's write-back (beta = 1)."""


@overload(_values_gemm_acc)
def _values_gemm_acc_impl(kind, fn, pt, half, vt, acc):
    if isinstance(vt.dtype, nb_types.Integer):

        def impl(kind, fn, pt, half, vt, acc):
            nk, nq = pt.shape
            tile_gemm_16_acc(fn, half[: nk * nq].reshape((nk, nq)).T, vt, acc)

        return impl
    return lambda kind, fn, pt, half, vt, acc: tile_gemm_acc(kind, fn, pt.T, vt, acc)


def _finite_values(vt, buf):
    """``vt`` (keys, Ev) with its NaN/inf entries replaced by 0, in ``buf``: what the GEMM of a
    tile with non-finite values reads, so that every row's product is the one a finite value of
    the same weight would give where that weight is 0 (16-bit values are checked finite by the
    wrapper: ``vt`` itself)."""


@overload(_finite_values)
def _finite_values_impl(vt, buf):
    if isinstance(vt.dtype, nb_types.Integer):
        return lambda vt, buf: vt

    def impl(vt, buf):
        nk, ev = vt.shape
        vz = buf[: nk * ev].reshape((nk, ev))
        zero = buf.dtype.type(0)
        for j in range(nk):
            for c in range(ev):
                x = vt[j, c]
                vz[j, c] = x if math.isfinite(x) else zero
        return readonly_like(vz, vt)  # vt's type: the product that reads it compiles once

    return impl


def _add_nonfinite(pt, vt, acc):
    """``acc[r, c] += pt[j, r] * vt[j, c]`` for every NaN/inf ``vt[j, c]`` and every row ``r`` that
    gives key ``j`` a weight > 0 (or NaN): a non-finite value reaches exactly the rows that weigh
    it, as in the ``reference`` oracle (a GEMM would make 0 * inf = NaN in the others)."""


@overload(_add_nonfinite)
def _add_nonfinite_impl(pt, vt, acc):
    if isinstance(vt.dtype, nb_types.Integer):
        return lambda pt, vt, acc: None

    def impl(pt, vt, acc):
        zero = acc.dtype.type(0)
        for j in range(vt.shape[0]):
            for c in range(vt.shape[1]):
                x = vt[j, c]
                if not math.isfinite(x):
                    for r in range(acc.shape[0]):
                        w = pt[j, r]
                        if w > zero or w != w:
                            acc[r, c] += w * x

    return impl


# Intel AMX (kernels.cpu.amx): the scores st = k_tile @ q_tile.T with k's rows as they are and
# q's rows paired once per task (qv), the transposed output acc.T += v.T @ P.T with v transposed
# once per call and P.T written in pairs by the softmax pass (_exp_into). Addresses and strides in
# bytes; every size a multiple of 32 (the wrapper checks before it picks these kinds).


def _finish_rows(acc, l, m, tm, ob, lse, f16):
    """The task's outputs: ``ob[r] = acc[r] / l[r]`` and ``lse[r] = m[r] + log(l[r])``, or 0 and
    -inf for a row with nothing visible (``l[r] = 0``); for the 16-bit paths' uint16 ``ob`` the
    row rounded to float16 (``f16``) or bfloat16, nearest even (the output's one rounding). ``tm``:
    scratch of the arithmetic's dtype. The loops over a row are written per output type (an
    inlined function per element took a reference count per row)."""


@overload(_finish_rows)
def _finish_rows_impl(acc, l, m, tm, ob, lse, f16):
    sixteen = isinstance(ob.dtype, nb_types.Integer)

    def impl(acc, l, m, tm, ob, lse, f16):
        ev = ob.shape[1]
        for r in range(ob.shape[0]):  # one vectorised loop (a libm call per row was 3% at L = 32)
            lse[r] = m[r] + fast_log(l[r])
        for r in range(ob.shape[0]):
            total = l[r]
            if total > 0.0 or total != total:
                tm[0] = 1.0 / total  # rounded to dt: the row's loop stays in dt and vectorises
                inv = tm[0]
                if sixteen and f16:
                    for c in range(ev):
                        ob[r, c] = f32_to_f16_bits(np.float32(acc[r, c] * inv))
                elif sixteen:
                    for c in range(ev):
                        ob[r, c] = f32_to_bf16_bits(np.float32(acc[r, c] * inv))
                else:
                    for c in range(ev):
                        ob[r, c] = acc[r, c] * inv
            else:
                for c in range(ev):
                    ob[r, c] = 0
                lse[r] = -np.inf

    return impl
