"""The decode step as matrix-vector products: the ``cpu`` backend's kernel for the common case of
``attention_with_kvcache`` (a contiguous cache of the compute dtype, no mods, at most
``DECODE_FUSED_ROWS`` query rows per cache head: one new token of a GQA group).

A task (sequence, cache head, key split) computes its rows' scores against each key tile as
matrix-vector products over the cache rows in place, four keys per pass over a query row (four
independent accumulators: the products of the four rows vectorise along the head dimension, and
the loop carries four sums, not one; the per-key horizontal sum of a one-key loop was a quarter of
the step). ONNX Runtime made the same change for M = 1 (a GEMV kernel in place of BLAS GEMM).
Then the online softmax over the tile and the weighted sum of the value rows, each value row read
once and skipped where its weight is 0 (so a NaN/inf value reaches only the rows that weigh it).
Split-KV and the merge are the general kernel's (``engine.kernels.cpu.decode``).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ...runtime.jit_cache import cache_enabled
from ..fastexp import fast_exp
from ..lse_merge import _merge_row
from ..mod_kernels import serial_version
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
    part_out: np.ndarray
    part_lse: np.ndarray
    out: np.ndarray
    lse: np.ndarray


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy", inline="always")
def _dot4(keys, j, qr, D):
    """Dot products of ``qr`` with key rows j ... j + 3."""
    zero = qr.dtype.type(0)
    t0 = zero
    t1 = zero
    t2 = zero
    t3 = zero
    for d in range(D):
        x = qr[d]
        t0 += keys[j, d] * x
        t1 += keys[j + 1, d] * x
        t2 += keys[j + 2, d] * x
        t3 += keys[j + 3, d] * x
    return t0, t1, t2, t3


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _gemv_task(task, args):
    """Rows of (sequence b, cache head hk), keys of split s: see the module's docstring."""
    B, Hq, L, D = args.q.shape
    Hkv = args.k_cache.shape[1]
    Dv = args.v_cache.shape[3]
    dt = args.q.dtype
    R = args.group * L
    s = task % args.splits
    rest = task // args.splits
    hk = rest % Hkv
    b = rest // Hkv
    consts = np.array([-np.inf, 0.0], dtype=dt)  # typed constants: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    S = args.seqlens_k[b]
    first = S - L
    row0 = (b * Hq + hk * args.group) * L
    T = args.block_k
    ibuf = np.empty(3 * R, dtype=np.int64)
    pos = ibuf[:R]
    lo = ibuf[R : 2 * R]
    hi = ibuf[2 * R :]
    fbuf = np.empty(R * D + R * T + R * Dv + 2 * R, dtype=dt)
    qs = fbuf[: R * D].reshape((R, D))
    st = fbuf[R * D : R * D + R * T].reshape((R, T))
    acc = fbuf[R * D + R * T : R * D + R * T + R * Dv].reshape((R, Dv))
    m = fbuf[R * D + R * T + R * Dv : R * D + R * T + R * Dv + R]
    lsum = fbuf[R * D + R * T + R * Dv + R :]
    klo, khi = S, 0
    full_lo, full_hi = 0, S
    for r in range(R):
        hq = hk * args.group + r // L
        i = r % L
        pos[r] = first + i
        top = S - 1
        if args.causal:
            top = min(top, pos[r])
        if args.right >= 0:
            top = min(top, pos[r] + args.right)
        bottom = 0 if args.left < 0 else max(0, pos[r] - args.left)
        lo[r] = bottom
        hi[r] = top
        if bottom <= top:
            klo = min(klo, bottom)
            khi = max(khi, top + 1)
        full_lo = max(full_lo, bottom)
        full_hi = min(full_hi, top + 1)
        for e in range(D):
            qs[r, e] = args.q[b, hq, i, e] * args.scale
        m[r] = neg_inf
        lsum[r] = zero
        for e in range(Dv):
            acc[r, e] = zero
    chunk = 0
    if khi > klo:
        chunk = ((khi - klo + args.splits - 1) // args.splits + 15) // 16 * 16
    s0 = klo + s * chunk
    s1 = min(khi, s0 + chunk)
    keys = args.k_cache[b, hk]
    values = args.v_cache[b, hk]
    j0 = s0
    while j0 < s1:
        nk = min(T, s1 - j0)
        for r in range(R):  # scores: matrix-vector products, four keys per pass
            qr = qs[r]
            c = 0
            while c + 4 <= nk:
                t0, t1, t2, t3 = _dot4(keys, j0 + c, qr, D)
                st[r, c] = t0
                st[r, c + 1] = t1
                st[r, c + 2] = t2
                st[r, c + 3] = t3
                c += 4
            while c < nk:
                t = zero
                for d in range(D):
                    t += keys[j0 + c, d] * qr[d]
                st[r, c] = t
                c += 1
        masked = j0 < full_lo or j0 + nk > full_hi  # some rows miss some keys of this tile
        for r in range(R):
            row = st[r, :nk]
            if masked:
                a, z = lo[r] - j0, hi[r] - j0
                for c in range(nk):
                    row[c] = row[c] if a <= c and c <= z else neg_inf
            mx = neg_inf
            for c in range(nk):
                x = row[c]
                mx = x if x > mx or x != x else mx  # a NaN score wins: the row becomes NaN
            # online softmax: a row with nothing visible yet shifts by 0 (its -inf stays -inf -> 0)
            mo = m[r]
            mn = mx if mx > mo or mx != mx else mo
            sh = mn if mn > neg_inf else zero
            al = fast_exp(mo - sh)
            m[r] = mn
            total = zero
            for c in range(nk):
                p = fast_exp(row[c] - sh)
                row[c] = p
                total += p
            lsum[r] = lsum[r] * al + total
            if al == zero:  # the old terms' weights underflowed: drop them (an inf stays out)
                for e in range(Dv):
                    acc[r, e] = zero
            elif al != 1:
                for e in range(Dv):
                    acc[r, e] *= al
        for c in range(nk):  # weighted value rows, each read once
            for r in range(R):
                w = st[r, c]
                if w != 0:
                    for e in range(Dv):
                        acc[r, e] += w * values[j0 + c, e]
        j0 += nk
    for r in range(R):
        total = lsum[r]
        n = row0 + r
        if total > 0.0 or total != total:
            inv = 1.0 / total
            for e in range(Dv):
                args.part_out[s, n, e] = acc[r, e] * inv
            args.part_lse[s, n] = m[r] + np.log(total)
        else:
            for e in range(Dv):
                args.part_out[s, n, e] = zero
            args.part_lse[s, n] = neg_inf


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _gemv_decode(args, mod_args):
    """Attention of ``q`` (B, Hq, L, D) against the first ``seqlens_k[b]`` keys of the contiguous
    caches ``k_cache`` (B, Hkv, S_max, D) and ``v_cache`` (B, Hkv, S_max, Dv), of q's dtype. Query
    row i of sequence b sits at position ``seqlens_k[b] - L + i``; ``causal`` (bottom right) and
    the window ``left``/``right`` (-1: unbounded) limit what it sees. ``group * L`` rows per task
    (at most ``DECODE_FUSED_ROWS``), key tiles of ``block_k``. ``part_out`` (splits, B*Hq*L, Dv)
    and ``part_lse`` (splits, B*Hq*L) receive each split's normalised result, merged into ``out``
    and ``lse`` when ``splits > 1`` (with one split, pass ``out``/``lse`` reshaped as the parts).
    Rows with no visible key get zeros and lse = -inf; NaN scores propagate to their rows.
    ``mod_args`` is the empty tuple (the call shape of the general kernel)."""
    B = args.q.shape[0]
    Hkv = args.k_cache.shape[1]
    for task in prange(B * Hkv * args.splits):
        _gemv_task(task, args)
    if args.splits > 1:
        for n in prange(args.out.shape[0]):
            _merge_row(args.part_out, args.part_lse, n, args.out, args.lse)


_gemv_decode_serial = serial_version(_gemv_decode, dict(fastmath=_FM, error_model="numpy"), _CACHE)


def gemv_kernel(serial: bool):
    """The parallel kernel, or its serial build for calls too small to wake the thread pool."""
    return _gemv_decode_serial if serial else _gemv_decode
