"""The tiled flash-attention backward kernels of the ``cuda`` backend (numba-cuda):
FlashAttention-2's backward (Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism
and Work Partitioning", 2023, Algorithm 2), split into three kernels so that it needs no atomics.

Nothing of size L x S is stored (except the float mask's gradient, only when it is asked for).
With ``P = exp(scale * q k^T + mask - lse)`` recomputed from the forward's log-sum-exp, ``Z`` the
dropout multipliers (1 / (1 - p) or 0, regenerated from the seed) and ``D = rowsum(dO * O)``:

    dV_j = sum_i (P Z)_ij dO_i     dP_ij = dO_i . V_j     dS_ij = P_ij (dP_ij Z_ij - D_i)
    dK_j = sum_i dS_ij (scale Q_i)                         dQ_i = scale sum_j dS_ij K_j

(with a ``score_mod``, dS is multiplied by its derivative where the weight is not 0).

The kernels (one compiled specialisation each per head sizes, tiles, mask kind, causality, mods,
dropout, storage; built by :func:`backward_kernels`):

1. ``_bwd_preprocess``: one thread per query row computes ``D_i`` and ``lrow_i`` (the forward's
   lse, with -inf, a row with no visible key, replaced by +inf so that its weights come out 0),
   both float32, (B, Hq, L).
2. ``_bwd_dkdv``: one thread block per (key tile, key/value head, batch entry), one thread per key
   row. The thread keeps its key and value rows and its dK and dV accumulators in registers; the
   block walks the query heads of the GQA group in order and, for each, the query tiles in order
   (causal: from the first tile that reaches the key tile's diagonal), staging a tile of scaled Q,
   dO, lrow and D in shared memory. Each dK/dV row is written by exactly one thread.
3. ``_bwd_dq``: one thread block per (query tile, query head, batch entry), one thread per query row,
   walking the key tiles in order (causal: only up to the block's last row) with K and V staged in
   shared memory, as the forward. Each dQ row is written by exactly one thread. With the mask
   gradient asked for, the same thread writes its row of dS into a float32 (B, Hq, L, S) buffer
   (zeros first, so skipped tiles read 0); the host reduces it to the mask's shape.

Why this split, and not FlashAttention-2's single kernel (dK/dV per key tile, dQ added to global
memory with atomics): atomic float additions land in a different order on every run, so gradients
would differ in their last bits from run to run. Here every output number is a sum that one thread
accumulates in a fixed order, so the gradients are bit for bit the same on every run on the same
GPU and tiles. The price is that the scores and weights are computed twice (once per kernel), about
1.4x the arithmetic of the atomic version, and the dQ kernel re-reads K and V.

Memory layout: every operand is read in place through the flat layouts of
``engine.kernels.cuda.flash_fwd`` (any strides, broadcast masks). ``meta`` (int64, ``(3 + B, 7)``)
holds per column (0 q, 1 k, 2 v, 3 mask, 4 out, 5 grad_out, 6 lse) the element strides of the head,
row and feature (or key) axes in rows 0-2 (lse: head and row, then 0) and the offset of flattened
batch entry ``b`` in row ``3 + b``. Storage is float32, float16 or bfloat16 (as ``uint16`` bit
patterns); all arithmetic is float32; dq/dk/dv are rounded once to the storage dtype.

The block map of a ``mask_mod`` (``tile_kinds``) is at the tiles ``(block_q, block_k)`` of both
kernels (the dK/dV kernel's key tile is ``block_k`` threads and stages ``block_q`` query rows; the
dQ kernel's query tile is ``block_q`` threads and stages ``block_k`` keys): an empty tile is
skipped by the whole block, the mask is evaluated per element only in partial tiles.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import cuda, float32  # this module is imported only when the cuda backend runs

from ..kinds import TILE_EMPTY, TILE_PARTIAL
from .bfloat16 import bf16_to_float32, float32_to_bf16
from .flash_fwd import _no_mask_mod, _no_score_mod, device_function, masked_score, philox_device, python_function
from .score_grad import _no_score_grad, complex_step_device_grad
from .signatures import backward_signatures

__all__ = [
    "backward_kernel_sources",
    "backward_kernels",
    "backward_signatures",
    "backward_shared_bytes",
    "complex_step_device_grad",
]


def backward_shared_bytes(E: int, Ev: int, block_q: int, block_k: int) -> int:
    """Bytes of static shared memory of the larger of the two tiled kernels."""
    dkdv = 4 * block_q * (max(E, 1) + max(Ev, 1)) + 8 * block_q
    dq = 4 * block_k * (max(E, 1) + max(Ev, 1))
    return max(dkdv, dq)


def backward_kernel_sources(
    E: int,
    Ev: int,
    block_q: int,
    block_k: int,
    mask_kind: int,
    causal: bool,
    score_mod=None,
    score_grad=None,
    mask_mod=None,
    bf16: bool = False,
    mask_bf16: bool = False,
    lse_bf16: bool = False,
    dropout: bool = False,
    want_dm: bool = False,
):
    """The plain Python functions ``(preprocess, dkdv, dq)`` of one specialisation.

    ``_bwd_preprocess(o, do, lse, meta, L, delta, lrow)``: grid ``(ceil(L / block_q), Hq, B)``,
    ``block_q`` threads; ``delta``/``lrow`` float32 ``(B, Hq, L)``.

    ``_bwd_dkdv(q, k, v, mask, do, meta, lrow, delta, L, S, group, scale, mod_args, tile_kinds,
    dk, dv, drop_threshold, drop_lo, drop_hi, drop_keep)``: grid ``(ceil(S / block_k), H, B)``,
    ``block_k`` threads; dk ``(B, H, S, E)``, dv ``(B, H, S, Ev)`` C order, storage dtype,
    summed over the query heads of each GQA group.

    ``_bwd_dq(q, k, v, mask, do, meta, lrow, delta, L, S, group, scale, mod_args, tile_kinds, dq,
    dm, drop_threshold, drop_lo, drop_hi, drop_keep)``: grid ``(ceil(L / block_q), Hq, B)``,
    ``block_q`` threads; dq ``(B, Hq, L, E)`` C order, storage dtype; with ``want_dm``, ``dm``
    float32 ``(B, Hq, L, S)`` receives dS (the gradient with respect to the score after the
    score_mod, so of the float mask), else it is never read.

    q, k, v, mask, o, do and lse are flat layouts (see the module docstring); the masks, causal
    (top-left), ``mod_args``, ``tile_kinds`` and the dropout arguments are those of the forward
    kernel (``engine.kernels.cuda.flash_fwd.flash_kernel_source``). ``score_grad`` is the
    derivative of ``score_mod`` with respect to the score that the mod declares (its Python function
    or a ``numba.njit`` one, compiled as a device function); ``None`` for the complex-step one,
    :func:`complex_step_device_grad`. ``bf16``:
    storage as bfloat16 bit patterns; ``mask_bf16``/``lse_bf16``: so is the float mask / lse.
    """
    EK = max(E, 1)
    EV = max(Ev, 1)
    BQ = block_q
    BK = block_k
    MASK = mask_kind
    CAUSAL = bool(causal)
    NEG_INF = np.float32(-np.inf)
    ZERO = np.float32(0.0)
    HAS_SCORE_MOD = score_mod is not None
    HAS_MASK_MOD = mask_mod is not None
    SCORE_MOD = device_function(score_mod) if HAS_SCORE_MOD else _no_score_mod
    if not HAS_SCORE_MOD:
        SCORE_GRAD = _no_score_grad
    elif score_grad is None:
        SCORE_GRAD = complex_step_device_grad(score_mod)
    else:
        SCORE_GRAD = device_function(score_grad)
    MASK_MOD = device_function(mask_mod) if HAS_MASK_MOD else _no_mask_mod
    EMPTY_TILE = np.int8(TILE_EMPTY)
    PARTIAL_TILE = np.int8(TILE_PARTIAL)
    LOAD = device_function(bf16_to_float32) if bf16 else float32
    STORE = device_function(float32_to_bf16) if bf16 else float32
    LSE_LOAD = device_function(bf16_to_float32) if lse_bf16 else float32
    DROPOUT = bool(dropout)
    WANT_DM = bool(want_dm)
    PHILOX = philox_device() if DROPOUT else None

    def _keep(b, h, i, j, drop_threshold, drop_lo, drop_hi, keep32):
        """The dropout multiplier of element (b, h, i, j): keep32 or 0 (``philox.keep_scale``)."""
        w0, w1, w2, w3 = PHILOX(np.uint64(j // 4), np.uint64(i), np.uint64(h), np.uint64(b), drop_lo, drop_hi)
        u = j % 4
        w = w0 if u == 0 else (w1 if u == 1 else (w2 if u == 2 else w3))
        return keep32 if w >= drop_threshold else ZERO

    KEEP = cuda.jit(device=True)(_keep) if DROPOUT else None

    SCORE = masked_score(
        MASK, CAUSAL, SCORE_MOD if HAS_SCORE_MOD else None, MASK_MOD if HAS_MASK_MOD else None, mask_bf16, SCORE_GRAD
    )

    def _bwd_preprocess(o, do, lse, meta, L, delta, lrow):
        i = cuda.blockIdx.x * BQ + cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if i < L:
            o_base = meta[3 + b, 4] + h * meta[0, 4] + i * meta[1, 4]
            d_base = meta[3 + b, 5] + h * meta[0, 5] + i * meta[1, 5]
            o_col = meta[2, 4]
            d_col = meta[2, 5]
            acc = ZERO
            for d in range(Ev):
                acc += LOAD(do[d_base + d * d_col]) * LOAD(o[o_base + d * o_col])
            delta[b, h, i] = acc
            x = LSE_LOAD(lse[meta[3 + b, 6] + h * meta[0, 6] + i * meta[1, 6]])
            lrow[b, h, i] = -x if x == NEG_INF else x

    def _bwd_dkdv(
        q,
        k,
        v,
        mask,
        do,
        meta,
        lrow,
        delta,
        L,
        S,
        group,
        scale,
        mod_args,
        tile_kinds,
        dk,
        dv,
        drop_threshold,
        drop_lo,
        drop_hi,
        drop_keep,
    ):
        tid = cuda.threadIdx.x
        kb = cuda.blockIdx.x
        j0 = kb * BK
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        j = j0 + tid
        live = j < S
        qs = cuda.shared.array((BQ, EK), dtype=float32)
        dos = cuda.shared.array((BQ, EV), dtype=float32)
        ls = cuda.shared.array(BQ, dtype=float32)
        dl = cuda.shared.array(BQ, dtype=float32)
        kr = cuda.local.array(EK, dtype=float32)
        vr = cuda.local.array(EV, dtype=float32)
        dka = cuda.local.array(EK, dtype=float32)
        dva = cuda.local.array(EV, dtype=float32)
        scale32 = float32(scale)
        keep32 = float32(drop_keep)
        q_row = meta[1, 0]
        q_col = meta[2, 0]
        d_row = meta[1, 5]
        d_col = meta[2, 5]
        m_col = meta[2, 3]
        if live:
            k_base = meta[3 + b, 1] + hk * meta[0, 1] + j * meta[1, 1]
            v_base = meta[3 + b, 2] + hk * meta[0, 2] + j * meta[1, 2]
            for e in range(E):
                kr[e] = LOAD(k[k_base + e * meta[2, 1]])
            for d in range(Ev):
                vr[d] = LOAD(v[v_base + d * meta[2, 2]])
        for e in range(E):
            dka[e] = ZERO
        for d in range(Ev):
            dva[d] = ZERO
        q_first = (j0 // BQ) * BQ if CAUSAL else 0  # earlier query tiles see none of these keys
        for hh in range(group):  # the GQA group's query heads, in order
            h = hk * group + hh
            q_base = meta[3 + b, 0] + h * meta[0, 0]
            d_base = meta[3 + b, 5] + h * meta[0, 5]
            m_base = meta[3 + b, 3] + h * meta[0, 3]
            for i0 in range(q_first, L, BQ):
                partial = False
                if HAS_MASK_MOD:
                    kind = tile_kinds[
                        b if tile_kinds.shape[0] > 1 else 0, h if tile_kinds.shape[1] > 1 else 0, i0 // BQ, kb
                    ]
                    if kind == EMPTY_TILE:
                        continue
                    partial = kind == PARTIAL_TILE
                nq = min(BQ, L - i0)
                cuda.syncthreads()  # every thread is done with the previous tile
                for idx in range(tid, nq * EK, BK):
                    r = idx // EK
                    e = idx - r * EK
                    if e < E:
                        qs[r, e] = LOAD(q[q_base + (i0 + r) * q_row + e * q_col]) * scale32
                for idx in range(tid, nq * EV, BK):
                    r = idx // EV
                    d = idx - r * EV
                    if d < Ev:
                        dos[r, d] = LOAD(do[d_base + (i0 + r) * d_row + d * d_col])
                for r in range(tid, nq, BK):
                    ls[r] = lrow[b, h, i0 + r]
                    dl[r] = delta[b, h, i0 + r]
                cuda.syncthreads()
                if live:
                    for r in range(nq):
                        i = i0 + r
                        s = ZERO
                        for e in range(E):
                            s += qs[r, e] * kr[e]
                        s, g = SCORE(s, b, h, i, j, mod_args, partial, mask, m_base + i * meta[1, 3] + j * m_col)
                        p = math.exp(s - ls[r])
                        z = float32(1.0)
                        if DROPOUT:
                            z = KEEP(b, h, i, j, drop_threshold, drop_lo, drop_hi, keep32)
                        pz = p * z
                        dp = ZERO
                        for d in range(Ev):
                            dva[d] += pz * dos[r, d]
                            dp += dos[r, d] * vr[d]
                        ds = p * (dp * z - dl[r]) if DROPOUT else p * (dp - dl[r])
                        if HAS_SCORE_MOD:  # chain rule through the score_mod; 0 where the weight is 0
                            ds = ds * g if p != ZERO else ZERO
                        for e in range(E):
                            dka[e] += ds * qs[r, e]
        if live:
            for e in range(E):
                dk[b, hk, j, e] = STORE(dka[e])
            for d in range(Ev):
                dv[b, hk, j, d] = STORE(dva[d])

    def _bwd_dq(
        q,
        k,
        v,
        mask,
        do,
        meta,
        lrow,
        delta,
        L,
        S,
        group,
        scale,
        mod_args,
        tile_kinds,
        dq,
        dm,
        drop_threshold,
        drop_lo,
        drop_hi,
        drop_keep,
    ):
        tid = cuda.threadIdx.x
        t0 = cuda.blockIdx.x * BQ
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        i = t0 + tid
        live = i < L
        hk = h // group
        ks = cuda.shared.array((BK, EK), dtype=float32)
        vs = cuda.shared.array((BK, EV), dtype=float32)
        qr = cuda.local.array(EK, dtype=float32)
        dor = cuda.local.array(EV, dtype=float32)
        dqa = cuda.local.array(EK, dtype=float32)
        scale32 = float32(scale)
        keep32 = float32(drop_keep)
        k_row = meta[1, 1]
        k_col = meta[2, 1]
        v_row = meta[1, 2]
        v_col = meta[2, 2]
        k_base = meta[3 + b, 1] + hk * meta[0, 1]
        v_base = meta[3 + b, 2] + hk * meta[0, 2]
        m_base = meta[3 + b, 3] + h * meta[0, 3] + i * meta[1, 3]
        m_col = meta[2, 3]
        li = ZERO
        di = ZERO
        if live:
            q_base = meta[3 + b, 0] + h * meta[0, 0] + i * meta[1, 0]
            for e in range(E):
                qr[e] = LOAD(q[q_base + e * meta[2, 0]]) * scale32
            d_base = meta[3 + b, 5] + h * meta[0, 5] + i * meta[1, 5]
            for d in range(Ev):
                dor[d] = LOAD(do[d_base + d * meta[2, 5]])
            li = lrow[b, h, i]
            di = delta[b, h, i]
            if WANT_DM:  # skipped tiles have dS = 0
                for jj in range(S):
                    dm[b, h, i, jj] = ZERO
        for e in range(E):
            dqa[e] = ZERO
        kend = S
        if CAUSAL:  # the block's last row sees keys up to itself: later tiles are never loaded
            kend = min(S, min(L, t0 + BQ))
        for j0 in range(0, kend, BK):
            partial = False
            if HAS_MASK_MOD:
                kind = tile_kinds[
                    b if tile_kinds.shape[0] > 1 else 0, h if tile_kinds.shape[1] > 1 else 0, cuda.blockIdx.x, j0 // BK
                ]
                if kind == EMPTY_TILE:
                    continue
                partial = kind == PARTIAL_TILE
            nk = min(BK, kend - j0)
            cuda.syncthreads()
            for idx in range(tid, nk * EK, BQ):
                c = idx // EK
                e = idx - c * EK
                if e < E:
                    ks[c, e] = LOAD(k[k_base + (j0 + c) * k_row + e * k_col])
            for idx in range(tid, nk * EV, BQ):
                c = idx // EV
                d = idx - c * EV
                if d < Ev:
                    vs[c, d] = LOAD(v[v_base + (j0 + c) * v_row + d * v_col])
            cuda.syncthreads()
            if live:
                for c in range(nk):
                    j = j0 + c
                    s = ZERO
                    for e in range(E):
                        s += qr[e] * ks[c, e]
                    s, g = SCORE(s, b, h, i, j, mod_args, partial, mask, m_base + j * m_col)
                    p = math.exp(s - li)
                    z = float32(1.0)
                    if DROPOUT:
                        z = KEEP(b, h, i, j, drop_threshold, drop_lo, drop_hi, keep32)
                    dp = ZERO
                    for d in range(Ev):
                        dp += dor[d] * vs[c, d]
                    ds = p * (dp * z - di) if DROPOUT else p * (dp - di)
                    if WANT_DM:
                        dm[b, h, i, j] = ds
                    if HAS_SCORE_MOD:
                        ds = ds * g if p != ZERO else ZERO
                    for e in range(E):
                        dqa[e] += ds * ks[c, e]
        if live:
            for e in range(E):
                dq[b, h, i, e] = STORE(dqa[e] * scale32)

    return _bwd_preprocess, _bwd_dkdv, _bwd_dq


_kernels: dict = {}
_kernels_lock = threading.Lock()


#: the boolean options of ``backward_kernel_sources``, in its order after the mods
_FLAGS = ("bf16", "mask_bf16", "lse_bf16", "dropout", "want_dm")


def backward_kernels(
    E, Ev, block_q, block_k, mask_kind, causal, score_mod=None, score_grad=None, mask_mod=None, **flags
):
    """The three ``cuda.jit`` dispatchers ``(preprocess, dkdv, dq)`` of one specialisation (the
    arguments of :func:`backward_kernel_sources`; built once per process, each compiles lazily once
    per argument types)."""
    unknown = sorted(set(flags) - set(_FLAGS))
    if unknown:
        raise TypeError(f"backward_kernels got unexpected options {unknown}")
    mods = tuple(None if m is None else python_function(m) for m in (score_mod, score_grad, mask_mod))
    key = (int(E), int(Ev), int(block_q), int(block_k), int(mask_kind), bool(causal))
    key += mods + tuple(bool(flags.get(f, False)) for f in _FLAGS)
    with _kernels_lock:
        kerns = _kernels.get(key)
        if kerns is None:
            kerns = tuple(cuda.jit(fn) for fn in backward_kernel_sources(*key))
            _kernels[key] = kerns
        return kerns
