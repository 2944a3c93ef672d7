"""The tiled flash-attention forward kernel of the ``cuda`` backend (numba-cuda).

One thread block per (query tile, query head, batch entry); one thread per query row. The block
walks the key tiles: all its threads stage a ``block_k x E`` tile of K and a ``block_k x Ev`` tile of
V in shared memory (converted to float32), then each thread scores its row against the tile (its
scaled query row sits in registers), folds the tile into its running maximum, running sum and
float32 output accumulator (online softmax), and the block moves on. No L x S matrix exists
anywhere; per block the working set is the two shared tiles plus one row of state per thread.

Inputs are read through *flat layouts*, so that any strided device array (a transposed torch
tensor, a broadcast mask) is used in place: each of q, k, v and the mask is a 1-D array over the
memory span of the caller's array, and ``meta`` (int64, shape ``(3 + B, 4)``) holds, per operand
column (0 q, 1 k, 2 v, 3 mask), the element strides of the head, row and feature (or key) axes in
rows 0-2 and the element offset of flattened batch entry ``b`` in row ``3 + b``. A broadcast axis
has stride 0, which is how a mask of shape ``(L, S)`` or ``(B, 1, 1, S)`` serves every head and
row without being materialised.

Compile-time constants (one kernel per combination, built by :func:`flash_kernel`): the head sizes
E and Ev (so the loops over them unroll and the row state stays in registers), the tile sizes, the
mask kind and causality. The storage dtype (float16 or float32) comes from the arguments; all
arithmetic is float32.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import cuda, float32  # this module is imported only when the cuda backend runs

__all__ = ["MASK_NONE", "MASK_BOOL", "MASK_FLOAT", "flash_kernel", "flash_kernel_source", "kernel_signature",
           "shared_bytes"]

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

#: static shared memory per block is limited to 48 KiB; tiles stay below this
SHARED_LIMIT = 48 * 1024


def shared_bytes(E: int, Ev: int, block_k: int) -> int:
    """Bytes of shared memory one block of the kernel uses."""
    return 4 * block_k * (max(E, 1) + max(Ev, 1))


def flash_kernel_source(E: int, Ev: int, block_q: int, block_k: int, mask_kind: int, causal: bool):
    """The plain Python function of one kernel specialisation (before ``cuda.jit``).

    ``_flash_forward(q, k, v, mask, meta, L, S, group, scale, out, lse)``: ``q``, ``k``, ``v``,
    ``mask`` are 1-D flat layouts (see the module docstring; ``mask`` is a one-element dummy with
    ``MASK_NONE``), ``meta`` the int64 strides and batch offsets, ``out`` a C-order
    ``(B, Hq, L, Ev)`` array and ``lse`` ``(B, Hq, L)``, both of the storage dtype. Launch with
    grid ``(ceil(L / block_q), Hq, B)`` and ``block_q`` threads. Boolean masks: True = may attend;
    float masks are added (a ``-inf`` entry hides the key even when the score is NaN).
    ``causal``: top-left, row i sees keys j <= i; key tiles right of the block's last row are
    never loaded. Rows with no visible key get zeros and lse = -inf; NaN scores propagate to their
    rows (out and lse NaN), as in the ``cpu`` kernel.
    """
    EK = max(E, 1)   # local/shared arrays need a size >= 1; the loops still run E times
    EV = max(Ev, 1)
    BQ = block_q
    BK = block_k
    MASK = mask_kind
    CAUSAL = bool(causal)
    NEG_INF = np.float32(-np.inf)
    ZERO = np.float32(0.0)
    ONE = np.float32(1.0)

    def _flash_forward(q, k, v, mask, meta, L, S, group, scale, out, lse):
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
        acc = cuda.local.array(EV, dtype=float32)
        sc = cuda.local.array(BK, dtype=float32)

        q_row = meta[1, 0]
        q_col = meta[2, 0]
        k_row = meta[1, 1]
        k_col = meta[2, 1]
        v_row = meta[1, 2]
        v_col = meta[2, 2]
        k_base = meta[3 + b, 1] + hk * meta[0, 1]
        v_base = meta[3 + b, 2] + hk * meta[0, 2]
        m_base = meta[3 + b, 3] + h * meta[0, 3] + i * meta[1, 3]
        m_col = meta[2, 3]

        scale32 = float32(scale)
        if live:
            q_base = meta[3 + b, 0] + h * meta[0, 0] + i * q_row
            for e in range(E):
                qr[e] = float32(q[q_base + e * q_col]) * scale32
        for d in range(Ev):
            acc[d] = ZERO
        m = NEG_INF   # running maximum of this row
        l = ZERO      # running sum of exp(score - shift)

        kend = S
        if CAUSAL:  # the block's last row sees keys up to itself: later tiles are never loaded
            kend = min(S, min(L, t0 + BQ))
        for j0 in range(0, kend, BK):
            nk = min(BK, kend - j0)
            cuda.syncthreads()  # every thread is done with the previous tile
            for idx in range(tid, nk * EK, BQ):
                c = idx // EK
                e = idx - c * EK
                if e < E:
                    ks[c, e] = float32(k[k_base + (j0 + c) * k_row + e * k_col])
            for idx in range(tid, nk * EV, BQ):
                c = idx // EV
                e = idx - c * EV
                if e < Ev:
                    vs[c, e] = float32(v[v_base + (j0 + c) * v_row + e * v_col])
            cuda.syncthreads()
            ncol = nk
            if CAUSAL:
                ncol = min(nk, i - j0 + 1)  # keys right of the diagonal are not even scored
            if live and ncol > 0:
                tmax = NEG_INF
                for c in range(ncol):
                    s = ZERO
                    for e in range(E):
                        s += qr[e] * ks[c, e]
                    if MASK == MASK_BOOL:
                        if not mask[m_base + (j0 + c) * m_col]:
                            s = NEG_INF
                    elif MASK == MASK_FLOAT:
                        mv = float32(mask[m_base + (j0 + c) * m_col])
                        s = NEG_INF if mv == NEG_INF else s + mv
                    sc[c] = s
                    tmax = s if s > tmax else tmax  # NaN never wins: it reaches l through exp
                mn = tmax if tmax > m else m
                # a row with nothing visible yet shifts by 0 so that exp(-inf - 0) = 0
                sh = mn if mn > NEG_INF else ZERO
                alpha = math.exp(m - sh)
                tsum = ZERO
                for c in range(ncol):
                    p = math.exp(sc[c] - sh)
                    sc[c] = p
                    tsum += p
                l = l * alpha + tsum
                m = mn
                for d in range(Ev):
                    a = acc[d] * alpha
                    for c in range(ncol):
                        a += sc[c] * vs[c, d]
                    acc[d] = a
        if live:
            if l > ZERO or l != l:
                inv = ONE / l
                for d in range(Ev):
                    out[b, h, i, d] = acc[d] * inv
                lse[b, h, i] = m + math.log(l)
            else:
                for d in range(Ev):
                    out[b, h, i, d] = ZERO
                lse[b, h, i] = NEG_INF

    return _flash_forward


_kernels: dict = {}
_kernels_lock = threading.Lock()


def flash_kernel(E: int, Ev: int, block_q: int, block_k: int, mask_kind: int, causal: bool):
    """The ``cuda.jit`` dispatcher for one specialisation (built once per process, then reused).

    It compiles lazily, once per argument types (float16 or float32 storage, mask dtype).
    """
    key = (int(E), int(Ev), int(block_q), int(block_k), int(mask_kind), bool(causal))
    with _kernels_lock:
        kern = _kernels.get(key)
        if kern is None:
            kern = cuda.jit(flash_kernel_source(*key))
            _kernels[key] = kern
        return kern


def kernel_signature(storage, mask=None):
    """The argument types the ``cuda`` backend launches the kernel with, for ``compile_ptx``.

    ``storage``: ``np.float16`` or ``np.float32``; ``mask``: the mask dtype (``np.bool_`` for a
    boolean mask and for the no-mask dummy; the storage dtype for float masks, to which host
    masks are cast).
    """
    from numba import from_dtype, types

    st = from_dtype(np.dtype(storage))
    mt = from_dtype(np.dtype(np.bool_ if mask is None else mask))
    return (st[::1], st[::1], st[::1], mt[::1], types.int64[:, ::1], types.int64, types.int64,
            types.int64, types.float64, st[:, :, :, ::1], st[:, :, ::1])
