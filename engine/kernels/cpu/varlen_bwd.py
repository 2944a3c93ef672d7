"""The backward kernel of ``engine.varlen_attention`` on the ``cpu`` backend: FlashAttention-2's
backward (Dao 2023, Algorithm 2) over packed sequences of different lengths.

The weights are recomputed tile by tile from the forward's log-sum-exp, ``P = exp(S - lse)``, so
memory stays linear in the tokens; with ``D = rowsum(dO * O)`` (computed by the op)::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D) * g,   dK = scale dS^T Q,   dQ = scale dS K

(``g``: the score_mod's derivative with respect to the score, 1 without one). Given the forward's
``lse`` and ``out`` with attention sinks, the same formulas give the gradients with the sinks
(``engine.problems.sinks``).

One task per (sequence, key/value head, run of key tiles). A task owns the dK and dV rows of its
key tiles, summing over every query head of its GQA group and every query tile that sees the
keys (bottom-right causal and the window limit which: the cost follows ``len_q x len_k`` of the
sequence, visible part only), and adds its dQ contributions into its own slice of ``dq_part``
(one per run of key tiles): no two tasks write one element, and the runs are summed in a fixed
order afterwards, so the gradients are the same bits on every run with the same thread count.
Tasks are dealt to the threads by cost as the forward's (``varlen_fwd.deal``).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types

from ...runtime.jit_cache import cache_enabled
from ..fastexp import softmax_exp
from ..identity_mods import no_mask_mod, no_score_grad, no_score_mod
from ..mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop, row_types
from ..mod_kernels import ModKernels
from ..task_pointer import field_dtype, return_types, vector
from .gemm import jit_gemm, tile_gemm
from .mod_loops import mask_keys, score_grad_keys
from .tile_ops import _FM
from .varlen_fwd import deal
from .varlen_rows import diagonal_split, key_range

_CACHE = cache_enabled()

__all__ = ["VarlenBackwardArgs", "varlen_backward_kernel", "varlen_backward_epilogue"]


class VarlenBackwardArgs(NamedTuple):
    """Everything the kernel reads but the mods' arguments, built in one place (the ``cpu``
    backend's varlen backward op); see :func:`_varlen_backward`."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    do: np.ndarray
    lrow: np.ndarray
    delta: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray
    causal: bool
    left: int
    right: int
    scale: float
    group: int
    block_q: int
    block_k: int
    fq: int
    strip: int
    splits: int
    threads: int
    has_score_mod: bool
    has_mask_mod: bool
    gemm_kind: int
    gemm_fn: int
    jit_scores: int
    jit_scores_h: int
    dq_part: np.ndarray
    dk: np.ndarray
    dv: np.ndarray


@njit(cache=_CACHE)
def _schedule(args):
    """``(order, bin_start)``: task ``(b * H + hk) * splits + s`` (sequence b, key/value head hk,
    run s of its key tiles) dealt to the threads by estimated cost (its visible rows x keys)."""
    B = args.cu_q.shape[0] - 1
    cost = np.empty(B, np.float64)
    for b in range(B):
        L = args.cu_q[b + 1] - args.cu_q[b]
        S = args.cu_k[b + 1] - args.cu_k[b]
        cost[b] = (L * S * args.group / args.splits + 256.0) if L > 0 and S > 0 else 0.0
        if args.causal and L > 0 and S > 0:  # about half of the square, or L x S below it
            cost[b] *= 0.5 if S >= L else 1.0
    return deal(cost, args.k.shape[1] * args.splits, args.threads)


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _bwd_task(task, scratch, args, mod_args):
    """One task: key tiles of run ``s`` of (sequence b, key/value head hk)."""
    E = args.q.shape[2]
    H = args.k.shape[1]
    Ev = args.v.shape[2]
    dt = args.q.dtype
    s = task % args.splits
    rest = task // args.splits
    hk = rest % H
    b = rest // H
    q0, k0 = args.cu_q[b], args.cu_k[b]
    L, S = args.cu_q[b + 1] - q0, args.cu_k[b + 1] - k0
    if L == 0 or S == 0:
        return
    nkb = (S + args.block_k - 1) // args.block_k
    t0, t1 = s * nkb // args.splits, (s + 1) * nkb // args.splits
    off = S - L  # row i is the token at position off + i
    bq, bk = args.block_q, args.block_k
    consts = np.array([-np.inf, 0.0, args.scale, 1.0], dtype=dt)  # typed constants: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    post_scale = consts[2]
    one = consts[3]
    # the forward's arithmetic (varlen_flash, as flash_fwd's): the scores are q @ k.T and the scale
    # goes into the exponential's argument, unless a score_mod reads the scaled scores or the
    # scale is not positive
    prescale = post_scale != one and (args.has_score_mod or not post_scale > zero)
    pass_scale = one if prescale else post_scale
    # the thread's scratch: key/value tiles, their gradients, a query tile, its dO, scores
    # (then weights), dP (then dS), the derivative g, and products
    o = 0
    kt = scratch[o : o + bk * E].reshape((bk, E))
    o += bk * E
    vt = scratch[o : o + bk * Ev].reshape((bk, Ev))
    o += bk * Ev
    dk_acc = scratch[o : o + bk * E].reshape((bk, E))
    o += bk * E
    dv_acc = scratch[o : o + bk * Ev].reshape((bk, Ev))
    o += bk * Ev
    qt = scratch[o : o + bq * E].reshape((bq, E))
    o += bq * E
    dot = scratch[o : o + bq * Ev].reshape((bq, Ev))
    o += bq * Ev
    p_buf = scratch[o : o + bq * bk]
    o += bq * bk
    dp_buf = scratch[o : o + bq * bk]
    o += bq * bk
    g_buf = scratch[o : o + bq * bk]
    o += bq * bk
    tk = scratch[o : o + bk * max(E, Ev)]
    o += bk * max(E, Ev)
    tq = scratch[o : o + bq * E].reshape((bq, E))
    o += bq * E
    qraw = scratch[o : o + args.fq * E].reshape((args.fq, E))
    o += args.fq * E
    ts = scratch[o : o + bk * args.fq]
    for kb in range(t0, t1):
        j0 = kb * bk
        nk = min(bk, S - j0)
        j1 = j0 + nk
        for c in range(nk):
            for e in range(E):
                kt[c, e] = args.k[k0 + j0 + c, hk, e]
            for e in range(Ev):
                vt[c, e] = args.v[k0 + j0 + c, hk, e]
        dk_acc[:nk] = zero
        dv_acc[:nk] = zero
        # the query rows that see some key of the tile
        i_lo, i_hi = 0, L
        if args.causal:
            i_lo = max(i_lo, j0 - off)
        if args.right >= 0:
            i_lo = max(i_lo, j0 - args.right - off)
        if args.left >= 0:
            i_hi = min(i_hi, j1 + args.left - off)
        # whole forward query tiles (fq rows from multiples of fq): each score is recomputed by
        # the product of the forward's shape that computed it
        i_lo = max(0, i_lo) // args.fq * args.fq
        i_hi = min(L, (i_hi + args.fq - 1) // args.fq * args.fq)
        for hq in range(hk * args.group, (hk + 1) * args.group):
            for i0 in range(i_lo, i_hi, bq):
                nq = min(bq, i_hi - i0)
                for r in range(nq):
                    for e in range(E):
                        qt[r, e] = args.q[q0 + i0 + r, hq, e] * args.scale
                    for e in range(Ev):
                        dot[r, e] = args.do[q0 + i0 + r, hq, e]
                p = p_buf[: nq * nk].reshape((nq, nk))
                dp = dp_buf[: nq * nk].reshape((nq, nk))
                g = g_buf[: nq * nk].reshape((nq, nk))
                # the scores as the forward computed them: per forward query tile, the product of
                # its shape (the generated kernel where the forward's tile was full) on the same
                # contiguous operands, over the keys up to the last one its rows see
                for c0 in range(0, nq, args.fq):
                    w = min(args.fq, nq - c0)
                    u0 = i0 + c0
                    for r in range(w):
                        for e in range(E):
                            qraw[r, e] = args.q[q0 + u0 + r, hq, e]
                    for r in range(w):  # hidden from every row of the forward's products
                        for c in range(nk):
                            p[c0 + r, c] = neg_inf
                    d, ke = diagonal_split(u0, u0 + w, j0, j1, off, S, args.causal, args.left, args.right, args.strip)
                    strips = 0 if d >= ke else (w + args.strip - 1) // args.strip
                    for part in range(1 + strips):  # the forward's products (varlen_flash)
                        if part == 0:
                            r0, r1, ka, kb = 0, w, j0, d
                        else:
                            r0 = (part - 1) * args.strip
                            r1 = min(r0 + args.strip, w)
                            _, hi_s = key_range(u0 + r0, u0 + r1, off, S, args.causal, args.left, args.right)
                            ka, kb = d, min(ke, hi_s)
                        if kb <= ka:
                            continue
                        ws, nks = r1 - r0, kb - ka
                        tsw = ts[: nks * ws].reshape((nks, ws))
                        ktp = kt[ka - j0 : kb - j0]
                        if args.jit_scores != 0 and nks == args.block_k and ws == args.fq:
                            jit_gemm(args.jit_scores, args.jit_scores_h, ktp, qraw[r0:r1].T, tsw)
                        else:
                            tile_gemm(args.gemm_kind, args.gemm_fn, ktp, qraw[r0:r1].T, tsw)
                        for r in range(ws):
                            row = p[c0 + r0 + r, ka - j0 : kb - j0]
                            if prescale:
                                for c in range(nks):
                                    row[c] = tsw[c, r] * post_scale
                            else:
                                for c in range(nks):
                                    row[c] = tsw[c, r]
                for r in range(nq):
                    pos = off + i0 + r
                    row = p[r]
                    # the mods' loops, by address (engine.kernels.mod_calls):
                    # loop 0 runs the score_mod (and its derivative), 1 the mask_mod
                    b_, h_, q_, k_ = np.int64(b), np.int64(hq), np.int64(pos), np.int64(j0)
                    if args.has_score_mod and not mod_loop(0, mod_args, row, g[r], b_, h_, q_, k_, mod_args):
                        raise RuntimeError(MOD_CALL_MISMATCH)
                    hi = S - 1
                    if args.causal:
                        hi = min(hi, pos)
                    if args.right >= 0:
                        hi = min(hi, pos + args.right)
                    lo = 0 if args.left < 0 else max(0, pos - args.left)
                    for c in range(nk):
                        j = j0 + c
                        row[c] = row[c] if lo <= j and j <= hi else neg_inf
                    c0, c1 = np.int64(max(lo - j0, 0)), np.int64(min(hi - j0 + 1, nk))
                    if (
                        args.has_mask_mod
                        and c0 < c1
                        and not mod_loop(1, mod_args, row, b_, h_, q_, k_, c0, c1, mod_args)
                    ):
                        raise RuntimeError(MOD_CALL_MISMATCH)
                    shift = args.lrow[q0 + i0 + r, hq]  # +inf for a row with no visible key: P = 0
                    for c in range(nk):
                        row[c] = softmax_exp(row[c] * pass_scale - shift)
                dv_part = tk[: nk * Ev].reshape((nk, Ev))
                tile_gemm(args.gemm_kind, args.gemm_fn, p.T, dot[:nq], dv_part)
                for c in range(nk):
                    for e in range(Ev):
                        dv_acc[c, e] += dv_part[c, e]
                tile_gemm(args.gemm_kind, args.gemm_fn, dot[:nq], vt[:nk].T, dp)
                for r in range(nq):
                    d = args.delta[q0 + i0 + r, hq]
                    for c in range(nk):
                        w = p[r, c]
                        x = w * (dp[r, c] - d)
                        if args.has_score_mod:  # a masked element has weight 0, whatever g is there
                            x = x * g[r, c] if w > zero else zero
                        dp[r, c] = x
                dk_part = tk[: nk * E].reshape((nk, E))
                tile_gemm(args.gemm_kind, args.gemm_fn, dp.T, qt[:nq], dk_part)
                for c in range(nk):
                    for e in range(E):
                        dk_acc[c, e] += dk_part[c, e]
                tile_gemm(args.gemm_kind, args.gemm_fn, dp, kt[:nk], tq[:nq])
                for r in range(nq):
                    for e in range(E):
                        args.dq_part[s, q0 + i0 + r, hq, e] += tq[r, e]
        for c in range(nk):
            for e in range(E):
                args.dk[k0 + j0 + c, hk, e] = dk_acc[c, e]
            for e in range(Ev):
                args.dv[k0 + j0 + c, hk, e] = dv_acc[c, e]


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _varlen_backward(args, mod_args):
    """dK, dV (``dk``/``dv`` (total_k, H, E/Ev), every row written) and the dQ parts
    (``dq_part`` (splits, total_q, Hq, E), zeroed by the caller; dQ is ``scale`` times their sum,
    :func:`varlen_backward_epilogue`) of packed sequences: ``q`` (total_q, Hq, E), ``k``/``v``,
    ``do`` (total_q, Hq, Ev), ``lrow`` (total_q, Hq) the forward's lse with -inf replaced by +inf,
    ``delta`` (total_q, Hq) ``rowsum(dO * O)``, ``cu_q``/``cu_k`` int64 offsets; every array of
    the compute dtype, C order. Rows, causal and the window as in the forward
    (``varlen_fwd``); mods with ``b`` the sequence and positions within it."""
    order, bin_start = _schedule(args)
    E, Ev = args.q.shape[2], args.v.shape[2]
    bq, bk = args.block_q, args.block_k
    size = 2 * bk * (E + Ev) + bq * (E + Ev) + 3 * bq * bk + bk * max(E, Ev) + bq * E + args.fq * (E + bk)
    for t in prange(bin_start.shape[0] - 1):
        scratch = np.empty(size, dtype=args.q.dtype)
        for x in range(bin_start[t], bin_start[t + 1]):
            _bwd_task(order[x], scratch, args, mod_args)


@njit(parallel=True, cache=_CACHE, error_model="numpy")
def varlen_backward_epilogue(dq_part, scale, dq):
    """dQ = scale * (the runs' parts summed in run order), (total_q, Hq, E)."""
    S, T, Hq, E = dq_part.shape
    for t in prange(T):
        for h in range(Hq):
            for e in range(E):
                acc = dq_part[0, t, h, e]
                for s in range(1, S):
                    acc += dq_part[s, t, h, e]
                dq[t, h, e] = acc * scale


_kernels = ModKernels(
    _varlen_backward,
    _bwd_task,
    {"_SCORE_MOD": no_score_mod, "_SCORE_GRAD": no_score_grad, "_MASK_MOD": no_mask_mod},
    dict(fastmath=_FM, error_model="numpy"),
    # the types the driver calls the task with (engine.kernels.task_pointer)
    task_types=lambda args, mod_args: _task_types(args, mod_args),
    loops=(
        ModLoop(score_grad_keys, ("_SCORE_MOD", "_SCORE_GRAD"), lambda a, m: _score_types(a, m)),
        ModLoop(mask_keys, ("_MASK_MOD",), lambda args, mod_args: row_types(args, "q", 6, mod_args)),
    ),
)


def _score_types(args, mod_args):
    """The score loop's: the row of scores and of derivatives, b, h, q, k0, mod_args."""
    row = types.Array(field_dtype(args, "q"), 1, "C")
    return (row, row) + (types.int64,) * 4 + (mod_args,)


_with_mods = _kernels.built


def _task_types(args, mod_args):
    order, _ = return_types(_schedule, args)
    return (order.dtype, vector(field_dtype(args, "q")), args, mod_args)


def varlen_backward_kernel(score_mod, score_grad, mask_mod):
    """The kernel for these mods (``None`` for none) and the score_mod's compiled derivative:
    ``_varlen_backward`` over its task, the same for all of them, which calls the mods' loops by
    address (``engine.kernels.mod_kernels``)."""
    if score_mod is None and mask_mod is None:  # a derivative alone is the identity's: no mods
        return _kernels(*(None,) * len(_kernels.defaults))
    return _kernels(score_mod, score_grad, mask_mod)
