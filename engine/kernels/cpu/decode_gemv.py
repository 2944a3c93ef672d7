"""The decode step as matrix-vector products: the ``cpu`` backend's kernel for the common case of
``attention_with_kvcache`` (a contiguous cache of the compute dtype, no mods, at most
``DECODE_FUSED_ROWS`` query rows per cache head: one new token of a GQA group).

A task (sequence, cache head, key split) computes its rows' scores against each key tile as
matrix-vector products over the cache rows in place, four keys per pass (four independent
accumulators: the products of the four rows vectorise along the head dimension, and the loop
carries four sums, not one; the per-key horizontal sum of a one-key loop was a quarter of the
step), every row of the task in one pass (a GQA group reads the four key rows from L1). ONNX
Runtime made the same change for M = 1 (a GEMV kernel in place of BLAS GEMM). Then the online
softmax over the tile and the weighted sum of the value rows (eight value rows per pass over
the accumulator for one row, four for each row of a GQA group: an eighth or a quarter of its loads
and stores), a value row skipped where its weight is 0 (so a NaN/inf value reaches only the rows
that weigh it). Those interleaved reads (four or eight rows at once, 512 bytes apart at D = 128)
are the faster order on some CPUs and three times slower on others: on AMD Zen 4, from a cache
larger than L3, the key pass read 11.6 GB/s interleaved against 30 one key at a time (and the
value pass 11 against 33), on one thread, while within L3 the four-key pass was 7% faster. So a
single row (``R == 1``: decode without GQA) reads in address order where ``sequential``, which
``engine.backends.cpu.autotune.tune_decode_order`` measures once per machine; in float32 with a
head of 16 to 128 in steps of 16 (to 64 without AVX-512) it takes neither loop but
``engine.kernels.cpu.decode_rows``' passes, which read in address order with the query or the
accumulator in vector registers (the decode step 1.3-1.5x faster at S = 128 to 4096 on AMD Zen 4;
docs/performance.md). With one split the
tasks write the result itself; with more, split-KV's partial
results are merged as in the general kernel (``engine.kernels.cpu.decode``). The tasks' scratch is
allocated once per call by the driver (a view reshaped inside a task costs a call into Numba's
runtime: a tenth of the step at short lengths).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ...runtime.jit_cache import cache_enabled
from ..fastexp import fast_exp
from ..lse_merge import _merge_row
from ..mod_kernels import serial_version
from .decode_rows import row_scores, row_values
from .tile_ops import _FM

_CACHE = cache_enabled()

__all__ = ["GemvArgs", "gemv_kernel"]


class GemvArgs(NamedTuple):
    """The arguments of :func:`_gemv_decode` (built in one place, the cpu decode op)."""

    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    seqlens_k: np.ndarray
    causal: bool
    left: int
    right: int
    scale: float
    group: int
    splits: int
    block_k: int
    sequential: bool
    out: np.ndarray
    lse: np.ndarray


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy", inline="always")
def _dot4(keys, j, qs, r, D):
    """Dot products of ``qs[r]`` with key rows j ... j + 3."""
    zero = qs.dtype.type(0)
    t0 = zero
    t1 = zero
    t2 = zero
    t3 = zero
    for d in range(D):
        x = qs[r, d]
        t0 += keys[j, d] * x
        t1 += keys[j + 1, d] * x
        t2 += keys[j + 2, d] * x
        t3 += keys[j + 3, d] * x
    return t0, t1, t2, t3


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy", inline="always")
def _pick(m, x):
    """The running maximum ``m`` after ``x``: a NaN wins, and stays."""
    return x if x > m or x != x else m


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy", inline="always")
def _row_max(sc, r, nk, neg_inf):
    """The maximum of ``sc[r, :nk]``, NaN if any is NaN: eight running maxima, combined at the
    end (a single one is a chain of compare-and-select, several cycles a score, that LLVM cannot
    vectorise without leave to ignore NaN)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = neg_inf
    c = 0
    while c + 8 <= nk:
        m0 = _pick(m0, sc[r, c])
        m1 = _pick(m1, sc[r, c + 1])
        m2 = _pick(m2, sc[r, c + 2])
        m3 = _pick(m3, sc[r, c + 3])
        m4 = _pick(m4, sc[r, c + 4])
        m5 = _pick(m5, sc[r, c + 5])
        m6 = _pick(m6, sc[r, c + 6])
        m7 = _pick(m7, sc[r, c + 7])
        c += 8
    while c < nk:
        m0 = _pick(m0, sc[r, c])
        c += 1
    return _pick(_pick(_pick(m0, m1), _pick(m2, m3)), _pick(_pick(m4, m5), _pick(m6, m7)))


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy", inline="always")
def _axpy8(acc, ws, c, values, j, Dv):
    """``acc[0] += ws[0, c] * values[j] + ... + ws[0, c + 7] * values[j + 7]``: one pass over
    ``acc[0]`` for eight value rows."""
    w0 = ws[0, c]
    w1 = ws[0, c + 1]
    w2 = ws[0, c + 2]
    w3 = ws[0, c + 3]
    w4 = ws[0, c + 4]
    w5 = ws[0, c + 5]
    w6 = ws[0, c + 6]
    w7 = ws[0, c + 7]
    for e in range(Dv):
        acc[0, e] += (w0 * values[j, e] + w1 * values[j + 1, e] + w2 * values[j + 2, e] + w3 * values[j + 3, e]) + (
            w4 * values[j + 4, e] + w5 * values[j + 5, e] + w6 * values[j + 6, e] + w7 * values[j + 7, e]
        )


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy", inline="always")
def _axpy4(acc, r, w0, w1, w2, w3, values, j, Dv):
    """``acc[r] += w0 * values[j] + ... + w3 * values[j + 3]``: one pass over ``acc[r]`` for four
    value rows."""
    for e in range(Dv):
        acc[r, e] += w0 * values[j, e] + w1 * values[j + 1, e] + w2 * values[j + 2, e] + w3 * values[j + 3, e]


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _gemv_task(task, args, qs, st, acc, ml, lim, part_out, part_lse):
    """Rows of (sequence b, cache head hk), keys of split s: see the module's docstring.
    ``qs``/``st``/``acc``/``ml``/``lim`` are the driver's scratch, indexed by task (views made
    here would cost a reshape each: a call into Numba's runtime); ``part_out``/``part_lse`` its
    split-KV partial results (unused with one split)."""
    B, Hq, L, D = args.q.shape
    Hkv = args.k_cache.shape[1]
    Dv = args.v_cache.shape[3]
    dt = args.q.dtype
    R = args.group * L
    s = task % args.splits
    rest = task // args.splits
    hk = rest % Hkv
    b = rest // Hkv
    neg_inf = dt.type(-np.inf)  # typed constants: no float64 promotion
    zero = dt.type(0)
    S = args.seqlens_k[b]
    first = S - L
    T = args.block_k
    klo, khi = S, 0
    full_lo, full_hi = 0, S
    for r in range(R):
        hq = hk * args.group + r // L
        i = r % L
        pos = first + i
        top = S - 1
        if args.causal:
            top = min(top, pos)
        if args.right >= 0:
            top = min(top, pos + args.right)
        bottom = 0 if args.left < 0 else max(0, pos - args.left)
        lim[task, 0, r] = bottom
        lim[task, 1, r] = top
        if bottom <= top:
            klo = min(klo, bottom)
            khi = max(khi, top + 1)
        full_lo = max(full_lo, bottom)
        full_hi = min(full_hi, top + 1)
        for e in range(D):
            qs[task, r, e] = args.q[b, hq, i, e] * args.scale
        ml[task, 0, r] = neg_inf
        ml[task, 1, r] = zero
        for e in range(Dv):
            acc[task, r, e] = zero
    chunk = 0
    if khi > klo:
        chunk = ((khi - klo + args.splits - 1) // args.splits + 15) // 16 * 16
    s0 = klo + s * chunk
    s1 = min(khi, s0 + chunk)
    keys = args.k_cache[b, hk]
    values = args.v_cache[b, hk]
    qt = qs[task]
    sc = st[task]
    ac = acc[task]
    j0 = s0
    while j0 < s1:
        nk = min(T, s1 - j0)
        # scores: matrix-vector products, four keys per pass over every row (the four key rows
        # stay in L1 for the rows of a GQA group), or for one row, where ``sequential``, one key
        # at a time (the cache read in address order: see the module's docstring)
        c = 0
        if R == 1 and row_scores(qt, keys, j0, nk, sc, D):  # float32, D a multiple of 16 up to 128
            c = nk
        elif R == 1 and args.sequential:
            while c < nk:
                t = zero
                for d in range(D):
                    t += keys[j0 + c, d] * qt[0, d]
                sc[0, c] = t
                c += 1
        while c + 4 <= nk:
            for r in range(R):
                t0, t1, t2, t3 = _dot4(keys, j0 + c, qt, r, D)
                sc[r, c] = t0
                sc[r, c + 1] = t1
                sc[r, c + 2] = t2
                sc[r, c + 3] = t3
            c += 4
        while c < nk:
            for r in range(R):
                t = zero
                for d in range(D):
                    t += keys[j0 + c, d] * qt[r, d]
                sc[r, c] = t
            c += 1
        masked = j0 < full_lo or j0 + nk > full_hi  # some rows miss some keys of this tile
        for r in range(R):
            if masked:
                a, z = lim[task, 0, r] - j0, lim[task, 1, r] - j0
                for c in range(nk):
                    sc[r, c] = sc[r, c] if a <= c and c <= z else neg_inf
            mx = _row_max(sc, r, nk, neg_inf)  # a NaN score wins: the row becomes NaN
            # online softmax: a row with nothing visible yet shifts by 0 (its -inf stays -inf -> 0)
            mo = ml[task, 0, r]
            mn = mx if mx > mo or mx != mx else mo
            sh = mn if mn > neg_inf else zero
            al = fast_exp(mo - sh)
            ml[task, 0, r] = mn
            total = zero
            for c in range(nk):
                p = fast_exp(sc[r, c] - sh)
                sc[r, c] = p
                total += p
            ml[task, 1, r] = ml[task, 1, r] * al + total
            if al == zero:  # the old terms' weights underflowed: drop them (an inf stays out)
                for e in range(Dv):
                    ac[r, e] = zero
            elif al != 1:
                for e in range(Dv):
                    ac[r, e] *= al
        # weighted value rows; a row of weight 0 is skipped (its NaN/inf must not reach a row
        # that does not weigh it). One row: eight value rows per pass over the accumulator (an
        # eighth of its loads and stores: 1.13x on a 256 MB cache, one thread, Intel Xeon); a
        # GQA group: four per pass for each row, the four value rows read from L1
        c = 0
        if R == 1 and row_values(ac, sc, values, j0, nk, Dv):  # the accumulator in registers
            c = nk
        elif R == 1 and args.sequential:  # one value row per pass, in address order
            while c < nk:
                w = sc[0, c]
                if w != zero:
                    for e in range(Dv):
                        ac[0, e] += w * values[j0 + c, e]
                c += 1
        elif R == 1:
            while c + 8 <= nk:
                weighed = True
                for cc in range(c, c + 8):
                    weighed = weighed and sc[0, cc] != zero
                if weighed:
                    _axpy8(ac, sc, c, values, j0 + c, Dv)
                else:  # some of the eight have weight 0: one by one, skipping those
                    for cc in range(c, c + 8):
                        w = sc[0, cc]
                        if w != zero:
                            for e in range(Dv):
                                ac[0, e] += w * values[j0 + cc, e]
                c += 8
        while c + 4 <= nk:
            for r in range(R):
                w0 = sc[r, c]
                w1 = sc[r, c + 1]
                w2 = sc[r, c + 2]
                w3 = sc[r, c + 3]
                if w0 != zero and w1 != zero and w2 != zero and w3 != zero:
                    _axpy4(ac, r, w0, w1, w2, w3, values, j0 + c, Dv)
                else:
                    for cc in range(c, c + 4):
                        w = sc[r, cc]
                        if w != zero:
                            for e in range(Dv):
                                ac[r, e] += w * values[j0 + cc, e]
            c += 4
        while c < nk:
            for r in range(R):
                w = sc[r, c]
                if w != zero:
                    for e in range(Dv):
                        ac[r, e] += w * values[j0 + c, e]
            c += 1
        j0 += nk
    for r in range(R):
        hq = hk * args.group + r // L
        i = r % L
        total = ml[task, 1, r]
        lse = neg_inf
        inv = zero
        if total > 0.0 or total != total:
            inv = 1.0 / total
            lse = ml[task, 0, r] + np.log(total)
        if args.splits == 1:  # the result itself
            for e in range(Dv):
                args.out[b, hq, i, e] = ac[r, e] * inv
            args.lse[b, hq, i] = lse
        else:
            n = (b * Hq + hq) * L + i
            for e in range(Dv):
                part_out[s, n, e] = ac[r, e] * inv
            part_lse[s, n] = lse


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _gemv_decode(args, mod_args):
    """Attention of ``q`` (B, Hq, L, D) against the first ``seqlens_k[b]`` keys of the contiguous
    caches ``k_cache`` (B, Hkv, S_max, D) and ``v_cache`` (B, Hkv, S_max, Dv), of q's dtype. Query
    row i of sequence b sits at position ``seqlens_k[b] - L + i``; ``causal`` (bottom right) and
    the window ``left``/``right`` (-1: unbounded) limit what it sees. ``group * L`` rows per task
    (at most ``DECODE_FUSED_ROWS``), key tiles of ``block_k``. ``out`` (B, Hq, L, Dv) and ``lse``
    (B, Hq, L) receive the result; with ``splits > 1`` each split's normalised result and its
    log-sum-exp go to partial arrays first, merged into ``out``/``lse``.
    Rows with no visible key get zeros and lse = -inf; NaN scores propagate to their rows.
    ``mod_args`` is the empty tuple (the call shape of the general kernel)."""
    B, Hq, L, D = args.q.shape
    Hkv = args.k_cache.shape[1]
    Dv = args.v_cache.shape[3]
    R = args.group * L
    n = B * Hkv * args.splits
    dt = args.q.dtype
    qs = np.empty((n, R, D), dtype=dt)
    st = np.empty((n, R, args.block_k), dtype=dt)
    acc = np.empty((n, R, Dv), dtype=dt)
    ml = np.empty((n, 2, R), dtype=dt)
    lim = np.empty((n, 2, R), dtype=np.int64)
    N = B * Hq * L
    P = args.splits if args.splits > 1 else 0
    part_out = np.empty((P, N, Dv), dtype=dt)
    part_lse = np.empty((P, N), dtype=dt)
    for task in prange(n):
        # the index is int64 when typed, uint64 when lowered: one type, one compilation of the
        # task (a uint64 one ran 5-8% slower: its index arithmetic mixes signedness)
        _gemv_task(np.int64(task), args, qs, st, acc, ml, lim, part_out, part_lse)
    if args.splits > 1:
        out = args.out.reshape((N, Dv))
        lse = args.lse.reshape((N,))
        for r in prange(N):
            _merge_row(part_out, part_lse, r, out, lse)


_gemv_decode_serial = serial_version(_gemv_decode, dict(fastmath=_FM, error_model="numpy"), _CACHE)


def gemv_kernel(serial: bool):
    """The parallel kernel, or its serial build for calls too small to wake the thread pool."""
    return _gemv_decode_serial if serial else _gemv_decode
