"""The steps of the ``cpu`` forward task that only its Intel AMX path takes (``kernels.cpu.amx``):
the queries in AMX's pair layout, both tile products by ``amx_gemm``'s address, the transposed
accumulator's rescale and output rows, and the driver's k and v.T. Each is an overload keyed on a
16-bit argument's type that compiles to nothing for float operands, so the float32/float64 task
carries none of their loops (they had added a fifth to its compile time: 9.4 -> 11.4 s cold on Zen 4);
they are plain calls, not inlined by Numba, as in ``tile_ops``.
"""

import numpy as np
from numba import njit
from numba import types as nb_types
from numba.extending import overload

from ..fastlog import fast_log
from .amx import amx_call, amx_release, operands_head
from .half import f32_to_bf16_bits, f32_to_f16_bits
from .tile_ops import _aligned_empty

__all__ = [
    "_pair_buffer",
    "_pair_rows",
    "_amx_scores",
    "_amx_rescale",
    "_amx_values_acc",
    "_amx_finish",
    "_transposed_rows",
    "_row_address",
    "_amx_operands",
]


def _pair_buffer(q, n):
    """uint32 scratch of ``n`` entries, 64-byte aligned, for AMX's paired query rows (empty for
    float operands)."""


@overload(_pair_buffer)
def _pair_buffer_impl(q, n):
    if isinstance(q.dtype, nb_types.Integer):
        return lambda q, n: _aligned_empty(n, np.uint32)
    return lambda q, n: np.empty(0, dtype=np.uint32)


def _pair_rows(q, b, h, t0, nt, qv):
    """``qv`` (E / 2, nt) uint32 = the pairs (q[b, h, t0 + r, 2i], q[b, h, t0 + r, 2i + 1]) in
    the low and high half of entry (i, r): the transposed queries in AMX's pair layout (nothing for
    float operands)."""


@overload(_pair_rows)
def _pair_rows_impl(q, b, h, t0, nt, qv):
    if isinstance(q.dtype, nb_types.Integer):

        def impl(q, b, h, t0, nt, qv):
            sixteen = np.uint32(16)
            full = nt // 16 * 16
            for r0 in range(0, full, 16):  # 16 rows at a time: both sides stay in cache
                for i in range(q.shape[3] // 2):
                    for r in range(r0, r0 + 16):
                        lo = np.uint32(q[b, h, t0 + r, 2 * i])
                        qv[i * nt + r] = lo | (np.uint32(q[b, h, t0 + r, 2 * i + 1]) << sixteen)
            for i in range(q.shape[3] // 2):
                for r in range(full, nt):
                    lo = np.uint32(q[b, h, t0 + r, 2 * i])
                    qv[i * nt + r] = lo | (np.uint32(q[b, h, t0 + r, 2 * i + 1]) << sixteen)

        return impl
    return lambda q, b, h, t0, nt, qv: None


def _amx_scores(fn, k, k_amx, b, hk, j0, qv, o, nt, st, stage):
    """``st`` (nk, nq) float32 = the nk key rows from ``j0`` of head ``hk`` (of ``k_amx``, their
    copy on cache lines, where it was made, else of ``k``) @ the queries ``o`` to ``o + nq`` of
    the task's paired rows ``qv`` (E / 2, nt). A tile with nk or nq not a multiple of 32 is
    multiplied at both rounded up (the rows past S are ``k_amx``'s zeros, the columns past nq
    other queries or ``qv``'s 32 spare entries) into ``stage`` (float32, at least that size),
    then copied into ``st``: each entry of a product depends on its own row and column only."""


@overload(_amx_scores)
def _amx_scores_impl(fn, k, k_amx, b, hk, j0, qv, o, nt, st, stage):
    if not isinstance(k.dtype, nb_types.Integer):
        return lambda fn, k, k_amx, b, hk, j0, qv, o, nt, st, stage: None

    def impl(fn, k, k_amx, b, hk, j0, qv, o, nt, st, stage):
        nk, nq = st.shape
        rows = _row_address(k_amx, b, hk, j0) if k_amx.size > 0 else _row_address(k, b, hk, j0)
        stride = k.shape[3] * 2
        queries = qv.ctypes.data + 4 * o
        mp, np_ = _rounded(nk), _rounded(nq)
        if mp == nk and np_ == nq:
            amx_call(fn, rows, stride, queries, 4 * nt, st.ctypes.data, 4 * nq, nk, nq, k.shape[3], False)
            return
        amx_call(fn, rows, stride, queries, 4 * nt, stage.ctypes.data, 4 * np_, mp, np_, k.shape[3], False)
        for c in range(nk):
            for r in range(nq):
                st[c, r] = stage[c * np_ + r]

    return impl


@njit(inline="always")
def _rounded(n):
    """``n`` rounded up to a multiple of 32 (``AMX_BLOCK``)."""
    return (n + 31) // 32 * 32


def _amx_rescale(acct, alpha, o, nq, k):
    """``acct[:, o : o + nq] *= alpha`` (per column: the accumulator is transposed); nothing for
    float ``k``."""


@overload(_amx_rescale)
def _amx_rescale_impl(acct, alpha, o, nq, k):
    if not isinstance(k.dtype, nb_types.Integer):
        return lambda acct, alpha, o, nq, k: None

    def impl(acct, alpha, o, nq, k):
        accts = acct[:, o : o + nq]  # (values are finite on this path: a product, no select)
        for c in range(acct.shape[0]):
            for r in range(nq):
                accts[c, r] *= alpha[r]

    return impl


def _amx_values_acc(fn, vt_all, b, hk, j0, nk, pairs, nq, acct, o, k):
    """``acct[:, o : o + nq] += vt_all[b, hk, :, j0 : j0 + nk] @ P`` for the probabilities'
    pairs (ceil(nk / 2), nq) at the start of ``pairs``: ``vt_all`` (B, H, Ev, Sp) the values
    transposed (zero past S), ``acct`` (Ev, ntp) float32 the task's transposed output, ntp a
    multiple of 32 (nothing for float ``k``). nk and nq not multiples of 32 are rounded up: the
    pair rows past nk are zeroed first (a zero times a value, never a stale NaN), and the columns
    past nq land in ``acct``'s spare columns."""


@overload(_amx_values_acc)
def _amx_values_acc_impl(fn, vt_all, b, hk, j0, nk, pairs, nq, acct, o, k):
    if not isinstance(k.dtype, nb_types.Integer):
        return lambda fn, vt_all, b, hk, j0, nk, pairs, nq, acct, o, k: None

    def impl(fn, vt_all, b, hk, j0, nk, pairs, nq, acct, o, k):
        s = vt_all.strides
        base = vt_all.ctypes.data + b * s[0] + hk * s[1] + j0 * s[3]
        kp = _rounded(nk)
        spare = pairs.view(np.uint32)
        for i in range((nk + 1) // 2 * nq, kp // 2 * nq):
            spare[i] = 0
        out = acct.ctypes.data + 4 * o
        ldc, m = 4 * acct.shape[1], vt_all.shape[2]
        amx_call(fn, base, s[2], pairs.ctypes.data, 4 * nq, out, ldc, m, _rounded(nq), kp, True)

    return impl


def _amx_finish(fn, acct, l, m, ob, lse, f16):
    """The AMX path's task outputs, as :func:`_finish_rows` writes them, from the transposed
    accumulator ``acct`` (Ev, nt): the rows' lse and 1 / sum first (into ``m``, which is spent),
    then the rows 16 at a time (:func:`_transposed_rows`); then the thread's AMX tiles released
    through ``fn``. Nothing for a float ``ob``."""


@overload(_amx_finish)
def _amx_finish_impl(fn, acct, l, m, ob, lse, f16):
    if not isinstance(ob.dtype, nb_types.Integer):  # (the AMX path's output is 16-bit)
        return lambda fn, acct, l, m, ob, lse, f16: None

    def impl(fn, acct, l, m, ob, lse, f16):
        nt = ob.shape[0]
        for r in range(nt):
            lse[r] = m[r] + fast_log(l[r])  # (vectorised: as _finish_rows)
        for r in range(nt):
            total = l[r]
            if total > 0.0 or total != total:
                m[r] = 1.0 / total
            else:
                lse[r] = -np.inf
                m[r] = 0.0  # nothing was added to such a row: 0 * 0
        _transposed_rows(acct, m, ob, f16)
        amx_release(fn)

    return impl


def _transposed_rows(acct, inv, ob, f16):
    """``ob[r, c] = acct[c, r] * inv[r]``, rounded as :func:`_finish_rows` rounds: the AMX path's
    transposed accumulator (Ev, ntp >= nt) written as the task's (nt, Ev) rows, 16 rows at a time (both
    sides stay in cache)."""


@overload(_transposed_rows)
def _transposed_rows_impl(acct, inv, ob, f16):
    if not isinstance(ob.dtype, nb_types.Integer):  # (the AMX path's output is 16-bit)
        return lambda acct, inv, ob, f16: None

    def impl(acct, inv, ob, f16):
        ev, nt = acct.shape[0], ob.shape[0]  # (acct's columns past nt: the padded products')
        full = nt // 16 * 16
        for r0 in range(0, full, 16):
            for c in range(ev):
                if f16:
                    for r in range(r0, r0 + 16):
                        ob[r, c] = f32_to_f16_bits(np.float32(acct[c, r] * inv[r]))
                else:
                    for r in range(r0, r0 + 16):
                        ob[r, c] = f32_to_bf16_bits(np.float32(acct[c, r] * inv[r]))
        for c in range(ev):
            for r in range(full, nt):
                if f16:
                    ob[r, c] = f32_to_f16_bits(np.float32(acct[c, r] * inv[r]))
                else:
                    ob[r, c] = f32_to_bf16_bits(np.float32(acct[c, r] * inv[r]))

    return impl


@njit(inline="always")
def _row_address(a, b, h, j):
    """The address of ``a[b, h, j, 0]`` (4-D, C order)."""
    s = a.strides
    return a.ctypes.data + b * s[0] + h * s[1] + j * s[2]


def _amx_operands(k, v, k_amx, vt_amx, bh):
    """:func:`~engine.kernels.cpu.amx.operands_head` for 16-bit operands (nothing for float ones)."""


@overload(_amx_operands)
def _amx_operands_impl(k, v, k_amx, vt_amx, bh):
    if isinstance(v.dtype, nb_types.Integer):
        return lambda k, v, k_amx, vt_amx, bh: operands_head(k, v, k_amx, vt_amx, bh)
    return lambda k, v, k_amx, vt_amx, bh: None
