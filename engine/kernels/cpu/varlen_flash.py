"""The packed-batch forward kernel of ``engine.varlen_attention`` on the ``cpu`` backend: the dense
forward's tile arithmetic (``engine.kernels.cpu.flash_fwd``) over sequences of different lengths.

Query, key and value are packed ``(total, heads, features)``; a task copies its query rows, and
each key and value tile it walks, into contiguous scratch (the copies cost one pass per task
against ``rows`` passes for the products; the GEMM reading the packed rows in place, 2 KiB apart
at 8 heads of 64, lost 20 % to cache-set conflicts, and head-major copies of the whole arrays cost
as much in fresh, page-faulting buffers), so the tiles, the GEMM provider and its generated
kernels are the dense forward's (``engine.backends.cpu.tiles``), on the same layouts. Each tile is computed as
in ``flash_fwd``: transposed scores ``st = k_tile @ q_tile.T`` (keys along the rows), the scale
applied inside the exponential's argument (``softmax_tile``'s one-pass softmax with a stale
maximum), the values' product
accumulated in the GEMM's write-back, non-finite values added exactly in the rows that weigh
them. The backward (``varlen_bwd``) recomputes the scores with the same products and arithmetic.

Sequence b owns query rows ``cu_q[b] ... cu_q[b+1] - 1`` and keys ``cu_k[b] ... cu_k[b+1] - 1``;
its row i is the token at position ``p = len_k - len_q + i`` (bottom-right alignment), which sees
keys ``j`` with ``j <= p`` (causal), ``p - left <= j`` (``left >= 0``) and ``j <= p + right``
(``right >= 0``); the mods see ``(b, h, p, j)``. Key tiles start at multiples of ``block_k``
within the sequence and query tiles at multiples of ``block_q``, as in the dense kernel; a tile
that the causal (or right-window) diagonal crosses computes the keys past its first row's last
visible one in strips of ``strip`` rows, each up to its own last visible key
(``varlen_rows.diagonal_split``), so most of the hidden triangle is not computed.

One task per (sequence, query head, run of ``block_q * sub_tiles`` rows): its cost is its rows
times the keys they see, which differs a lot between tasks (a causal 512-token sequence beside a
1-token one), so the tasks are dealt to the threads by estimated cost, largest first, in a snake
order (``varlen_fwd.deal``): the threads finish together. No result depends on the deal.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types

from ...runtime.jit_cache import cache_enabled
from ..fastexp import fast_exp
from ..identity_mods import no_mask_mod, no_score_mod
from ..mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop, row_types
from ..mod_kernels import ModKernels
from ..task_pointer import field_dtype, return_types, vector
from .gemm import jit_gemm
from .mod_loops import mask_queries, score_tile
from .softmax_tile import STALE_MAX_MARGIN, column_max, exp_tile
from .tile_ops import (
    _FM,
    _add_nonfinite,
    _aligned_empty,
    _finite_values,
    _line,
    _scores_gemm,
    _values_finite,
    _values_gemm_acc,
)
from .varlen_fwd import deal
from .varlen_rows import diagonal_split, key_range, visible_rows
from .vector_width import wide_vectors

_CACHE = cache_enabled()

__all__ = ["VarlenFlashArgs", "varlen_flash_kernel", "visible_rows", "diagonal_split"]

#: the scheduler's fixed cost of one task, in scores: scratch, the row state and the output rows
_TASK_OVERHEAD = 2048


class VarlenFlashArgs(NamedTuple):
    """Everything the kernel reads but the mods' arguments, built in one place (the ``cpu``
    backend's varlen op); see :func:`_varlen_flash`."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray
    causal: bool
    left: int
    right: int
    scale: float
    group: int
    block_q: int
    block_k: int
    sub_tiles: int
    strip: int
    has_score_mod: bool
    has_mask_mod: bool
    threads: int
    gemm_kind: int
    gemm_fn: int
    jit_scores: int
    jit_scores_h: int
    jit_values: int
    jit_values_h: int
    out: np.ndarray
    lse: np.ndarray


@njit(cache=_CACHE, inline="always")
def _scratch_size(bq, bk, sub_tiles, E, Ev):
    """Floats of one thread's scratch (:func:`_varlen_flash_task`)."""
    rows = bq * sub_tiles
    return (
        2 * _line(bk * bq)
        + 2 * _line(bk * Ev)
        + _line(bk * E)
        + _line(rows * E)
        + _line(rows * Ev)
        + 2 * _line(rows)
        + 5 * _line(bq)
    )


@njit(cache=_CACHE)
def _schedule(args):
    """``(task_b, task_t0, order, bin_start)``: the sequence and first row of every run of rows,
    and the tasks dealt to the threads: thread t runs ``order[bin_start[t] ... bin_start[t+1] -
    1]``; task ``base * Hq + h`` is run ``base`` of query head ``h``."""
    B = args.cu_q.shape[0] - 1
    Hq = args.q.shape[1]
    rows = args.block_q * args.sub_tiles
    nb = 0
    for b in range(B):
        nb += (args.cu_q[b + 1] - args.cu_q[b] + rows - 1) // rows
    task_b = np.empty(nb, np.int64)
    task_t0 = np.empty(nb, np.int64)
    cost = np.empty(nb, np.float64)
    x = 0
    for b in range(B):
        L = args.cu_q[b + 1] - args.cu_q[b]
        S = args.cu_k[b + 1] - args.cu_k[b]
        for t0 in range(0, L, rows):
            t1 = min(t0 + rows, L)
            lo, hi = key_range(t0, t1, S - L, S, args.causal, args.left, args.right)
            # about the rows times the keys each sees: the band between the first and last rows' ranges
            w0 = key_range(t0, t0 + 1, S - L, S, args.causal, args.left, args.right)
            w1 = key_range(t1 - 1, t1, S - L, S, args.causal, args.left, args.right)
            seen = 0.5 * ((w0[1] - w0[0]) + (w1[1] - w1[0]))
            task_b[x] = b
            task_t0[x] = t0
            cost[x] = (t1 - t0) * min(seen, hi - lo) + _TASK_OVERHEAD
            x += 1
    order, bin_start = deal(cost, Hq, args.threads)
    return task_b, task_t0, order, bin_start


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _varlen_flash_task(task, task_b, task_t0, fbuf, dbuf, args, mod_args):
    """One task: ``sub_tiles`` query tiles of one (sequence, query head), in the thread's scratch
    ``fbuf`` (:func:`_scratch_size` floats of the compute dtype) and ``dbuf`` (float64), reused by
    every task of the thread (allocating a task's dozen buffers cost more than the products of a
    64-token sequence's head)."""
    wide_vectors()
    Hq, E = args.q.shape[1], args.q.shape[2]
    Ev = args.v.shape[2]
    dt = args.out.dtype
    h = task % Hq
    base = task // Hq
    b = task_b[base]
    t0 = task_t0[base]
    q0, k0 = args.cu_q[b], args.cu_k[b]
    L, S = args.cu_q[b + 1] - q0, args.cu_k[b + 1] - k0
    off = S - L  # row i is the token at position off + i
    rows = args.block_q * args.sub_tiles
    t1 = min(t0 + rows, L)
    nt = t1 - t0
    hk = h // args.group
    consts = np.array([-np.inf, 0.0, args.scale, STALE_MAX_MARGIN, 1.0], dtype=dt)  # typed: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    post_scale = consts[2]
    margin = consts[3]
    one = consts[4]
    # as flash_fwd: the scale goes into the exponential's argument unless a mod reads the scaled
    # scores or the scale is not positive (a masked -inf times 0 is NaN)
    prescale = post_scale != one and (args.has_score_mod or not post_scale > zero)
    pass_scale = one if prescale else post_scale
    half = fbuf[:0]  # float operands: no 16-bit probabilities
    # the thread's scratch, cut for this task: segments start on 64-byte lines
    bq, bk = args.block_q, args.block_k
    o = 0
    st_buf = fbuf[o : o + bk * bq]
    o += _line(bk * bq)
    pt_buf = fbuf[o : o + bk * bq]
    o += _line(bk * bq)
    vz_buf = fbuf[o : o + bk * Ev]
    o += _line(bk * Ev)
    kbuf = fbuf[o : o + bk * E].reshape((bk, E))
    o += _line(bk * E)
    vbuf = fbuf[o : o + bk * Ev].reshape((bk, Ev))
    o += _line(bk * Ev)
    qbuf = fbuf[o : o + nt * E].reshape((nt, E))
    o += _line(rows * E)
    acc = fbuf[o : o + nt * Ev].reshape((nt, Ev))
    o += _line(rows * Ev)
    m = fbuf[o : o + nt]
    o += _line(rows)
    mr = fbuf[o : o + nt]  # the same unscaled: the score it was taken from (flash_fwd's)
    o += _line(rows)
    tm = fbuf[o : o + bq]
    o += _line(bq)
    tmx = fbuf[o : o + bq]
    o += _line(bq)
    shift_raw = fbuf[o : o + bq]
    o += _line(bq)
    alpha = fbuf[o : o + bq]
    o += _line(bq)
    tc = fbuf[o : o + bq]
    l = dbuf[:nt]  # noqa: E741  (float64 sums: see softmax_tile.SUM_CHUNK)
    ts = dbuf[_line(rows) : _line(rows) + bq]
    acc[:] = zero
    m[:] = neg_inf
    l[:] = 0.0
    for r in range(nt):  # element loops: a row slice assignment costs a call per row
        for e in range(E):
            qbuf[r, e] = args.q[q0 + t0 + r, h, e]
    klo, khi = key_range(t0, t1, off, S, args.causal, args.left, args.right)
    for j0 in range(klo // args.block_k * args.block_k, khi, args.block_k):
        j1 = min(j0 + args.block_k, khi)
        for c in range(j1 - j0):
            for e in range(E):
                kbuf[c, e] = args.k[k0 + j0 + c, hk, e]
            for e in range(Ev):
                vbuf[c, e] = args.v[k0 + j0 + c, hk, e]
        v_finite = _values_finite(vbuf[: j1 - j0])
        for sub in range(args.sub_tiles):
            u0 = t0 + sub * args.block_q
            u1 = min(u0 + args.block_q, t1)
            if u0 >= u1:
                continue
            d, ke = diagonal_split(u0, u1, j0, j1, off, S, args.causal, args.left, args.right, args.strip)
            strips = 0 if d >= ke else (u1 - u0 + args.strip - 1) // args.strip
            for part in range(1 + strips):  # keys j0 ... d - 1 for the whole tile, then d ... for strips
                if part == 0:
                    i0, i1, ka, kb = u0, u1, j0, d
                else:
                    i0 = u0 + (part - 1) * args.strip
                    i1 = min(i0 + args.strip, u1)
                    ka, kb = d, min(ke, key_range(i0, i1, off, S, args.causal, args.left, args.right)[1])
                lo, _ = key_range(i0, i1, off, S, args.causal, args.left, args.right)
                if kb <= ka or lo >= kb:  # no row of these sees a key of this part
                    continue
                nq = i1 - i0
                o = i0 - t0
                nk = kb - ka
                kt = kbuf[ka - j0 : kb - j0]
                vt = vbuf[ka - j0 : kb - j0]
                full = args.jit_scores != 0 and nk == args.block_k and nq == args.block_q
                st = st_buf[: nk * nq].reshape((nk, nq))
                qs = qbuf[o : o + nq].T  # (E, nq), read transposed by the GEMM
                if full:
                    jit_gemm(args.jit_scores, args.jit_scores_h, kt, qs, st)
                else:
                    _scores_gemm(args.gemm_kind, args.gemm_fn, kt, qs, st)
                if prescale:
                    for c in range(nk):
                        for r in range(nq):
                            st[c, r] *= post_scale
                # the mods' loops, by address (engine.kernels.mod_calls):
                # loop 0 runs the score_mod, 1 the mask_mod
                b_, h_, q_ = np.int64(b), np.int64(h), np.int64(off + i0)
                if args.has_score_mod and not mod_loop(0, mod_args, st, b_, h_, q_, np.int64(ka), mod_args):
                    raise RuntimeError(MOD_CALL_MISMATCH)
                # rows that see only part of the tile: -inf where hidden (causal, window, mask_mod)
                f0, _ = visible_rows(ka + nk - 1, i0, nq, off, args.causal, args.left, args.right)
                _, z0 = visible_rows(ka, i0, nq, off, args.causal, args.left, args.right)
                if args.has_mask_mod or f0 > 0 or z0 < nq - 1:
                    for c in range(nk):
                        first, last = visible_rows(ka + c, i0, nq, off, args.causal, args.left, args.right)
                        row = st[c]
                        for r in range(min(max(first, 0), nq)):
                            row[r] = neg_inf
                        for r in range(max(last + 1, 0), nq):
                            row[r] = neg_inf
                        r0, r1 = np.int64(max(first, 0)), np.int64(min(last + 1, nq))
                        if args.has_mask_mod and r0 < r1:
                            if not mod_loop(1, mod_args, row, b_, h_, q_, np.int64(ka + c), r0, r1, mod_args):
                                raise RuntimeError(MOD_CALL_MISMATCH)
                # the softmax as flash_fwd's (softmax_tile: one pass, a stale shift within the margin;
                # exponents, margin and rescale from each row's unscaled largest score, so a scaled
                # score past float32's integers cannot round the shift out of exp's range)
                fresh = False
                for r in range(nq):
                    fresh |= m[o + r] == neg_inf
                if fresh:
                    column_max(st, tm[:nq])
                for r in range(nq):
                    mo = m[o + r]
                    if mo == neg_inf:
                        mt = tm[r] * pass_scale
                        mn = mt if mt > mo else mo
                        alpha[r] = fast_exp(mo - (mn if mn > neg_inf else zero))
                        m[o + r] = mn
                        mr[o + r] = tm[r] if mn > neg_inf else zero
                    else:
                        alpha[r] = one
                    shift_raw[r] = mr[o + r]
                pt = pt_buf[: nk * nq].reshape((nk, nq))
                exp_tile(st, pt, pass_scale, shift_raw, ts, tc, tmx)
                redo = False
                for r in range(nq):
                    redo |= (tmx[r] - mr[o + r]) * pass_scale > margin
                if redo:
                    for r in range(nq):
                        if (tmx[r] - mr[o + r]) * pass_scale > margin:
                            alpha[r] *= fast_exp((mr[o + r] - tmx[r]) * pass_scale)
                            m[o + r] = tmx[r] * pass_scale
                            mr[o + r] = tmx[r]
                            shift_raw[r] = tmx[r]
                    exp_tile(st, pt, pass_scale, shift_raw, ts, tc, tmx)
                rescale = False
                for r in range(nq):
                    l[o + r] = l[o + r] * alpha[r] + ts[r]
                    rescale |= alpha[r] != one
                accs = acc[o : o + nq]
                if rescale:
                    for r in range(nq):
                        a = alpha[r]
                        if a == zero:  # the old terms' weights underflowed: drop them (an inf stays out)
                            for c in range(Ev):
                                accs[r, c] = zero
                        else:
                            for c in range(Ev):
                                accs[r, c] *= a
                if not v_finite:  # as flash_fwd: the finite part's product, then the NaN/inf values alone
                    vz = _finite_values(vt, vz_buf)
                    if full:
                        jit_gemm(args.jit_values, args.jit_values_h, pt, vz, accs)
                    else:
                        _values_gemm_acc(args.gemm_kind, args.gemm_fn, pt, half, vz, accs)
                    _add_nonfinite(pt, vt, accs)
                elif full:
                    jit_gemm(args.jit_values, args.jit_values_h, pt, vt, accs)
                else:
                    _values_gemm_acc(args.gemm_kind, args.gemm_fn, pt, half, vt, accs)
    for r in range(nt):
        total = l[r]
        orow = args.out[q0 + t0 + r, h]
        arow = acc[r]
        if total > 0.0 or total != total:
            tm[0] = 1.0 / total  # rounded to dt: the row's loop stays in dt and vectorises
            inv = tm[0]
            for c in range(Ev):
                orow[c] = arow[c] * inv
            args.lse[q0 + t0 + r, h] = m[r] + np.log(total)
        else:
            for c in range(Ev):
                orow[c] = zero
            args.lse[q0 + t0 + r, h] = neg_inf


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _varlen_flash(args, mod_args):
    """Every packed query row against its sequence's keys, with ``args`` a
    :class:`VarlenFlashArgs` and ``mod_args`` the mods' arguments.

    ``q`` (total_q, Hq, E), ``k`` (total_k, H, E), ``v`` (total_k, H, Ev): packed, C order,
    float32 or float64; ``cu_q``/``cu_k`` (B + 1,) int64 offsets; ``out`` (total_q, Hq, Ev) and
    ``lse`` (total_q, Hq) of the same dtype, every row written (a row that sees no key: zeros and
    -inf; NaN scores make their rows NaN). ``block_q`` x ``block_k`` tiles, ``sub_tiles`` query
    tiles per task, ``gemm_kind``/``gemm_fn`` the tile products' provider and ``jit_*`` its
    generated kernels for full tiles (0: none), as ``flash_fwd``'s.
    """
    task_b, task_t0, order, bin_start = _schedule(args)
    size = _scratch_size(args.block_q, args.block_k, args.sub_tiles, args.q.shape[2], args.v.shape[2])
    rows = args.block_q * args.sub_tiles
    for t in prange(bin_start.shape[0] - 1):
        fbuf = _aligned_empty(size, args.out.dtype)
        dbuf = np.empty(_line(rows) + args.block_q, dtype=np.float64)
        for x in range(bin_start[t], bin_start[t + 1]):
            _varlen_flash_task(order[x], task_b, task_t0, fbuf, dbuf, args, mod_args)


_OPTIONS = dict(fastmath=_FM, error_model="numpy")
_kernels = ModKernels(
    _varlen_flash,
    _varlen_flash_task,
    {"_SCORE_MOD": no_score_mod, "_MASK_MOD": no_mask_mod},
    _OPTIONS,
    # the types the driver calls the task with (engine.kernels.task_pointer)
    task_types=lambda args, mod_args: _task_types(args, mod_args),
    loops=(
        ModLoop(score_tile, ("_SCORE_MOD",), lambda args, mod_args: _tile_types(args, mod_args)),
        ModLoop(mask_queries, ("_MASK_MOD",), lambda args, mod_args: row_types(args, "out", 6, mod_args)),
    ),
)


def _tile_types(args, mod_args):
    """The score loop's: the transposed tile, b, h, q0, k0, mod_args."""
    return (types.Array(field_dtype(args, "out"), 2, "C"),) + (types.int64,) * 4 + (mod_args,)


def _task_types(args, mod_args):
    task_b, task_t0, order, _ = return_types(_schedule, args)
    fbuf, dbuf = vector(field_dtype(args, "out")), vector(types.float64)
    return (order.dtype, task_b, task_t0, fbuf, dbuf, args, mod_args)


_with_mods = _kernels.built


def varlen_flash_kernel(score_mod, mask_mod, serial=False):
    """The kernel for these mods (``None`` for none): ``_varlen_flash`` over its task, the same for
    every pair, which calls the mods' loops by address (``engine.kernels.mod_kernels``).
    ``serial=True``: compiled without ``parallel``, for calls too small to wake the thread pool."""
    return _kernels(score_mod, mask_mod, serial=serial)
