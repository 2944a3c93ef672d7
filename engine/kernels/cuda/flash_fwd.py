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
mask kind, causality and the mods. The storage dtype (float16 or float32) and the types of
``mod_args`` come from the arguments; the kernel's own arithmetic is float32 (a mod computes in
whatever types its arguments give, and its result is rounded to float32).

Mods (``score_mod``/``mask_mod``, see ``engine.problems.mods``) become device functions
(``cuda.jit(device=True)`` of their Python code) that the kernel calls per score, so NVVM inlines
them. ``tile_kinds`` is the ``mask_mod``'s block map at the kernel's tiles: a key tile that is empty
for the whole query tile is skipped by the whole block (the map is per block, so the skip is
uniform and the block's barriers stay matched); the mask is evaluated per element only in partial
tiles.
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np
from numba import cuda, float32  # this module is imported only when the cuda backend runs
from numba.cuda.extending import overload

from ..fastexp import fast_exp, fast_tanh
from ..kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE, TILE_EMPTY, TILE_PARTIAL
from ..philox import philox4x32
from .bfloat16 import bf16_to_float32, float32_to_bf16
from .signatures import kernel_signature

__all__ = [
    "MASK_NONE",
    "MASK_BOOL",
    "MASK_FLOAT",
    "flash_kernel",
    "flash_kernel_source",
    "kernel_signature",
    "shared_bytes",
    "device_function",
    "philox_device",
]


# mods written for the cpu kernels may call these; on the GPU libdevice's expf/tanhf are already
# fast (the polynomials exist only because Numba's CPU exp/tanh do not vectorise)
@overload(fast_exp, inline="always")
def _fast_exp_cuda(t):
    return lambda t: math.exp(t)


@overload(fast_tanh, inline="always")
def _fast_tanh_cuda(x):
    return lambda x: math.tanh(x)


_device_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_device_lock = threading.Lock()


def python_function(fn):
    """The pure-Python function behind a mod (``fn.py_func`` of a ``numba.njit`` one)."""
    return getattr(fn, "py_func", fn)


def device_function(mod):
    """The ``cuda.jit(device=True)`` function of a mod's Python code (of ``mod.py_func`` for a
    ``numba.njit`` one), built once per function."""
    fn = python_function(mod)
    with _device_lock:
        dev = _device_functions.get(fn)
        if dev is None:
            dev = _device_functions[fn] = cuda.jit(device=True)(fn)
        return dev


_philox_device = None


def philox_device():
    """``engine.kernels.philox.philox4x32`` (its Python code) as a CUDA device function: the same
    Philox4x32-10 words as the CPU kernels and the oracle, in uint64 integer arithmetic only."""
    global _philox_device
    with _device_lock:
        if _philox_device is None:
            _philox_device = cuda.jit(device=True)(philox4x32.py_func)
        return _philox_device


def _no_score_mod(score, b, h, q_idx, kv_idx):
    return score


def _no_mask_mod(b, h, q_idx, kv_idx):
    return True


#: static shared memory per block is limited to 48 KiB; tiles stay below this
SHARED_LIMIT = 48 * 1024


def shared_bytes(E: int, Ev: int, block_k: int) -> int:
    """Bytes of shared memory one block of the kernel uses."""
    return 4 * block_k * (max(E, 1) + max(Ev, 1))


def masked_score(mask_kind: int, causal: bool, score_mod, mask_mod, mask_bf16: bool, score_grad=None):
    """The device function ``score(s, b, h, i, j, mod_args, partial, mask, m_index) -> (s, g)``
    that every kernel applies to the scaled dot product ``s`` of element (b, h, i, j): the
    score_mod, then the mask_mod (in ``partial`` tiles), top-left ``causal``, and the boolean or
    float mask read at ``mask[m_index]`` (-inf where hidden; a -inf mask entry hides even a NaN
    score). ``g`` is d score_mod / d score from the device function ``score_grad`` (the backward's;
    0 without one). ``score_mod``/``mask_mod``: device functions or None; ``mask_bf16``: the float
    mask holds bfloat16 bits."""
    has_score_mod, has_mask_mod, want_grad = score_mod is not None, mask_mod is not None, score_grad is not None
    score_fn = score_mod if has_score_mod else _no_score_mod
    mask_fn = mask_mod if has_mask_mod else _no_mask_mod
    grad_fn = score_grad if want_grad else _no_score_mod
    mask_load = device_function(bf16_to_float32) if mask_bf16 else float32
    neg_inf, zero, is_causal = np.float32(-np.inf), np.float32(0.0), bool(causal)

    def _score(s, b, h, i, j, mod_args, partial, mask, m_index):
        g = zero
        if has_score_mod:
            if want_grad:
                g = float32(grad_fn(s, b, h, i, j, *mod_args))
            s = float32(score_fn(s, b, h, i, j, *mod_args))
        if has_mask_mod and partial:
            if not mask_fn(b, h, i, j, *mod_args):
                s = neg_inf
        if is_causal and j > i:
            s = neg_inf
        if mask_kind == MASK_BOOL:
            if not mask[m_index]:
                s = neg_inf
        elif mask_kind == MASK_FLOAT:
            mv = mask_load(mask[m_index])
            s = neg_inf if mv == neg_inf else s + mv
        return s, g

    return cuda.jit(device=True, inline=True)(_score)


def flash_kernel_source(
    E: int,
    Ev: int,
    block_q: int,
    block_k: int,
    mask_kind: int,
    causal: bool,
    score_mod=None,
    mask_mod=None,
    bf16: bool = False,
    mask_bf16: bool = False,
    dropout: bool = False,
):
    """The plain Python function of one kernel specialisation (before ``cuda.jit``).

    ``_flash_forward(q, k, v, mask, meta, L, S, group, scale, mod_args, tile_kinds, out, lse,
    drop_threshold, drop_lo, drop_hi, drop_keep)``:
    ``q``, ``k``, ``v``,
    ``mask`` are 1-D flat layouts (see the module docstring; ``mask`` is a one-element dummy with
    ``MASK_NONE``), ``meta`` the int64 strides and batch offsets, ``out`` a C-order
    ``(B, Hq, L, Ev)`` array and ``lse`` ``(B, Hq, L)``, both of the storage dtype. Launch with
    grid ``(ceil(L / block_q), Hq, B)`` and ``block_q`` threads. Boolean masks: True = may attend;
    float masks are added (a ``-inf`` entry hides the key even when the score is NaN).
    ``causal``: top-left, row i sees keys j <= i; key tiles right of the block's last row are
    never loaded. Rows with no visible key get zeros and lse = -inf; NaN scores propagate to their
    rows (out and lse NaN), and a NaN/inf value reaches only the rows that give its key a weight
    above 0, as in the ``cpu`` backend.

    ``score_mod(score, b, h, q_idx, kv_idx, *mod_args)`` rewrites each scaled score before the
    masks; ``mask_mod(b, h, q_idx, kv_idx, *mod_args)`` hides keys, with ``tile_kinds`` (int8,
    ``(Bt, Ht, ceil(L / block_q), ceil(S / block_k))``, Bt/Ht 1 when the mask ignores b/h) its
    block map at these tiles. ``b`` is the flattened batch index, ``h`` the query head. Without
    mods ``mod_args`` is ``()`` and ``tile_kinds`` is never read.

    ``bf16``: q, k, v, out and lse hold bfloat16 bit patterns (``uint16``), converted to float32
    on load and rounded to nearest even on store; ``mask_bf16``: so does a float mask.

    ``dropout``: each weight ``(b, h, i, j)`` is kept (and multiplied by ``drop_keep`` =
    1 / (1 - p), float32) when word ``j % 4`` of Philox4x32-10 at counter ``(j // 4, i, h, b)``
    under the key ``(drop_lo, drop_hi)`` is ``>= drop_threshold`` (uint64), else dropped: the
    stream and layout of ``engine.kernels.philox.keep_scale``, so the same seed drops the same
    elements as on the CPU. ``lse`` stays that of the weights before dropout. Without
    ``dropout`` the four arguments are never read (pass ``0, 0, 0, 1.0``).
    """
    EK = max(E, 1)  # local/shared arrays need a size >= 1; the loops still run E times
    EV = max(Ev, 1)
    BQ = block_q
    BK = block_k
    CAUSAL = bool(causal)
    NEG_INF = np.float32(-np.inf)
    ZERO = np.float32(0.0)
    ONE = np.float32(1.0)
    HAS_MASK_MOD = mask_mod is not None
    # causal is applied by not scoring keys right of the diagonal at all (ncol below)
    SCORE = masked_score(
        mask_kind,
        False,
        None if score_mod is None else device_function(score_mod),
        device_function(mask_mod) if HAS_MASK_MOD else None,
        mask_bf16,
    )
    EMPTY_TILE = np.int8(TILE_EMPTY)
    PARTIAL_TILE = np.int8(TILE_PARTIAL)
    # float16/float32 storage converts with plain casts (float16 on store, by the assignment)
    LOAD = device_function(bf16_to_float32) if bf16 else float32
    STORE = device_function(float32_to_bf16) if bf16 else float32
    DROPOUT = bool(dropout)
    PHILOX = philox_device() if DROPOUT else None

    def _flash_forward(
        q,
        k,
        v,
        mask,
        meta,
        L,
        S,
        group,
        scale,
        mod_args,
        tile_kinds,
        out,
        lse,
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
                qr[e] = LOAD(q[q_base + e * q_col]) * scale32
        for d in range(Ev):
            acc[d] = ZERO
        m = NEG_INF  # running maximum of this row
        l = ZERO  # running sum of exp(score - shift)

        kend = S
        if CAUSAL:  # the block's last row sees keys up to itself: later tiles are never loaded
            kend = min(S, min(L, t0 + BQ))
        partial = False
        for j0 in range(0, kend, BK):
            if HAS_MASK_MOD:
                # one kind for the whole block: every thread skips together or none does
                kind = tile_kinds[
                    b if tile_kinds.shape[0] > 1 else 0, h if tile_kinds.shape[1] > 1 else 0, cuda.blockIdx.x, j0 // BK
                ]
                if kind == EMPTY_TILE:
                    continue
                partial = kind == PARTIAL_TILE
            nk = min(BK, kend - j0)
            cuda.syncthreads()  # every thread is done with the previous tile
            for idx in range(tid, nk * EK, BQ):
                c = idx // EK
                e = idx - c * EK
                if e < E:
                    ks[c, e] = LOAD(k[k_base + (j0 + c) * k_row + e * k_col])
            for idx in range(tid, nk * EV, BQ):
                c = idx // EV
                e = idx - c * EV
                if e < Ev:
                    vs[c, e] = LOAD(v[v_base + (j0 + c) * v_row + e * v_col])
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
                    s, _ = SCORE(s, b, h, i, j0 + c, mod_args, partial, mask, m_base + (j0 + c) * m_col)
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
                if DROPOUT:  # after the sum: lse is that of the weights before dropout, as on the CPU
                    keep32 = float32(drop_keep)
                    ci = np.uint64(i)
                    ch = np.uint64(h)
                    cb = np.uint64(b)
                    for g in range(j0 // 4, (j0 + ncol + 3) // 4):
                        w0, w1, w2, w3 = PHILOX(np.uint64(g), ci, ch, cb, drop_lo, drop_hi)
                        for u in range(4):
                            c = 4 * g + u - j0
                            if c >= 0 and c < ncol:
                                w = w0 if u == 0 else (w1 if u == 1 else (w2 if u == 2 else w3))
                                sc[c] = sc[c] * keep32 if w >= drop_threshold else ZERO
                for d in range(Ev):
                    a = acc[d] * alpha
                    for c in range(ncol):
                        # a key with weight 0 adds nothing, even a NaN/inf value (0 * NaN is NaN):
                        # a non-finite value reaches only the rows that attend to it (a select)
                        p = sc[c]
                        a += p * vs[c, d] if p != ZERO else ZERO
                    acc[d] = a
        if live:
            if l > ZERO or l != l:
                inv = ONE / l
                for d in range(Ev):
                    out[b, h, i, d] = STORE(acc[d] * inv)
                lse[b, h, i] = STORE(m + math.log(l))
            else:
                for d in range(Ev):
                    out[b, h, i, d] = STORE(ZERO)
                lse[b, h, i] = STORE(NEG_INF)

    return _flash_forward


_kernels: dict = {}
_kernels_lock = threading.Lock()


def flash_kernel(
    E: int,
    Ev: int,
    block_q: int,
    block_k: int,
    mask_kind: int,
    causal: bool,
    score_mod=None,
    mask_mod=None,
    bf16: bool = False,
    mask_bf16: bool = False,
    dropout: bool = False,
):
    """The ``cuda.jit`` dispatcher for one specialisation (built once per process, then reused).

    It compiles lazily, once per argument types (float16, float32 or bfloat16-as-uint16 storage,
    mask dtype, the types of ``mod_args``).
    """
    key = (
        int(E),
        int(Ev),
        int(block_q),
        int(block_k),
        int(mask_kind),
        bool(causal),
        None if score_mod is None else python_function(score_mod),
        None if mask_mod is None else python_function(mask_mod),
        bool(bf16),
        bool(mask_bf16),
        bool(dropout),
    )
    with _kernels_lock:
        kern = _kernels.get(key)
        if kern is None:
            kern = cuda.jit(flash_kernel_source(*key))
            _kernels[key] = kern
        return kern
