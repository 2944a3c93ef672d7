"""The split-KV decoding kernels of the ``cuda`` backend (``engine.attention_with_kvcache``).

The design is FlashAttention's ``flash_attn_with_kvcache`` with ``num_splits`` (Dao et al.,
FlashAttention-2, 2023) and Flash-Decoding (Dao, Haziza, Massa, Sizov, "Flash-Decoding for
long-context inference", 2023): decoding reads the whole cache for a handful of query rows, so it
is bound by memory bandwidth, and the work is cut so that every streaming multiprocessor streams
its share of the cache.

* ``_decode_split`` (:func:`decode_kernel_source`): one thread block per (row block x split,
  cache head, sequence). A block's rows are every query head that shares its cache head times
  every new token (GQA packing, at most ``block_rows`` of them), so each cache tile is read from
  global memory once for the whole group. Its keys are one of ``splits`` equal chunks of the keys
  its rows can see (the same chunks as the ``cpu`` kernel). The block stages a ``block_k x E`` key
  tile and a ``block_k x Ev`` value tile in shared memory as float32 (consecutive threads read
  consecutive elements of a cache row: coalesced loads; 16-bit entries are widened in registers),
  scores all its rows against the tile, folds the tile into each row's running max, sum and
  float32 accumulator (online softmax, Milakov & Gimelshein 2018), and writes each row's
  normalised partial output and log-sum-exp for its split.
* ``_merge_splits`` (:func:`merge_kernel_source`): one thread per output element merges the
  ``splits`` partials of its row exactly, in split order (deterministic, no atomics), with the
  formula of ``engine.kernels.lse_merge._merge_row`` (the code behind ``engine.merge_attention``),
  and stores the result in the output dtype. Numba cannot call an ``njit`` function from a GPU
  kernel, so the row merge is written again here, line for line; the tests compare the two.

Caches are pages ``(num_pages, Hkv, page_size, D)`` read through ``page_table`` (B, max_pages);
a contiguous cache ``(B, Hkv, S_max, D)`` is the same with one page per sequence
(``page_table[b, 0] = b``). Row i of sequence b is at position ``seqlens_k[b] - L + i``
(bottom-right alignment); ``causal`` and the window ``left``/``right`` (-1: unbounded) limit the
keys it sees; the mods see absolute positions, as in the ``cpu`` kernel. The new keys and values
are written before this kernel runs: on the host for NumPy caches, by ``_write_entries`` (one
thread per new entry) on the caller's stream for device caches.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import cuda, float32, int64  # this module is imported only when the cuda backend runs

from .bfloat16 import bf16_to_float32, float32_to_bf16
from .flash_fwd import SHARED_LIMIT, _no_mask_mod, _no_score_mod, device_function, python_function
from .signatures import decode_signature, merge_signature, write_signature
from .storage import CACHE_BFLOAT16, CACHE_FLOAT16, CACHE_FLOAT32

__all__ = [
    "CACHE_FLOAT32",
    "CACHE_FLOAT16",
    "CACHE_BFLOAT16",
    "decode_kernel",
    "decode_kernel_source",
    "decode_shared_bytes",
    "decode_signature",
    "merge_kernel",
    "merge_kernel_source",
    "merge_signature",
    "write_kernel",
    "write_kernel_source",
    "write_signature",
    "SHARED_LIMIT",
]

#: how a cache (or an output, or new entries) is stored: float32, float16, bfloat16 bits (uint16)

_NEG_INF = np.float32(-np.inf)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


def decode_shared_bytes(E: int, Ev: int, block_rows: int, block_k: int) -> int:
    """Bytes of shared memory one block of ``_decode_split`` uses (float32 tiles, int64 ranges)."""
    floats = block_rows * E + block_k * (E + 1) + block_k * Ev + block_rows * block_k + block_rows * Ev
    return 4 * (floats + 3 * block_rows) + 8 * 2 * block_rows


def _loader(kind: int):
    return device_function(bf16_to_float32) if kind == CACHE_BFLOAT16 else float32


def _storer(kind: int):
    # float16/float32 outputs convert by the assignment (round to nearest even)
    return device_function(float32_to_bf16) if kind == CACHE_BFLOAT16 else float32


def decode_kernel_source(
    E: int,
    Ev: int,
    block_rows: int,
    block_k: int,
    threads: int,
    cache_kind: int,
    score_mod=None,
    mask_mod=None,
    q_kind: int = CACHE_FLOAT32,
):
    """The plain Python function of one specialisation of the split-KV kernel (before ``cuda.jit``).

    ``_decode_split(q, k_pages, v_pages, page_table, seqlens_k, group, splits, causal, left, right,
    scale, mod_args, part_out, part_lse)``:

    * ``q`` ``(B, Hq, L, E)`` of float32, float16 or ``uint16`` bfloat16 bits (``q_kind``), any
      strides (a device query is read in place), widened and scaled in the kernel;
    * ``k_pages``/``v_pages`` ``(num_pages, Hkv, page_size, E/Ev)`` of float32, float16 or
      ``uint16`` bfloat16 bits (``cache_kind``), C order;
    * ``page_table`` int32 ``(B, max_pages)``; ``seqlens_k`` int64 ``(B,)``, keys per sequence
      (after the write);
    * ``group = Hq // Hkv``, ``splits`` >= 1, ``causal`` (bottom right), ``left``/``right`` the
      window (-1 unbounded), ``scale`` float;
    * ``part_out`` float32 ``(splits, B * Hq * L, Ev)`` and ``part_lse`` float32
      ``(splits, B * Hq * L)``: each split's normalised partial result (zeros and ``-inf`` where a
      split holds no visible key of a row), merged by ``_merge_splits``.

    Launch with grid ``(ceil(group * L / block_rows) * splits, Hkv, B)`` and ``threads`` threads.
    Every loop bound that governs a barrier is the same for all threads of a block.
    """
    EK, EV, RB, BK, NT = int(E), int(Ev), int(block_rows), int(block_k), int(threads)
    KP = EK + 1  # a padded key row: threads scoring consecutive keys hit different banks
    NEG_INF, ZERO, ONE = _NEG_INF, _ZERO, _ONE
    HAS_SCORE_MOD = score_mod is not None
    HAS_MASK_MOD = mask_mod is not None
    SCORE_MOD = device_function(score_mod) if HAS_SCORE_MOD else _no_score_mod
    MASK_MOD = device_function(mask_mod) if HAS_MASK_MOD else _no_mask_mod
    LOAD = _loader(cache_kind)
    QLOAD = _loader(q_kind)

    def _decode_split(
        q,
        k_pages,
        v_pages,
        page_table,
        seqlens_k,
        group,
        splits,
        causal,
        left,
        right,
        scale,
        mod_args,
        part_out,
        part_lse,
    ):
        tid = cuda.threadIdx.x
        s = cuda.blockIdx.x % splits
        rb = cuda.blockIdx.x // splits
        hk = cuda.blockIdx.y
        b = cuda.blockIdx.z
        Hq = q.shape[1]
        L = q.shape[2]
        ps = k_pages.shape[2]
        R = group * L
        r0 = rb * RB
        nr = min(RB, R - r0)
        S = seqlens_k[b]
        first = S - L  # position of query row 0 in its sequence
        row0 = (b * Hq + hk * group) * L + r0  # flattened (b, head, token) of this block's row 0

        qs = cuda.shared.array((RB, EK), dtype=float32)
        ks = cuda.shared.array((BK, KP), dtype=float32)
        vs = cuda.shared.array((BK, EV), dtype=float32)
        sc = cuda.shared.array((RB, BK), dtype=float32)
        acc = cuda.shared.array((RB, EV), dtype=float32)
        mrow = cuda.shared.array(RB, dtype=float32)
        lrow = cuda.shared.array(RB, dtype=float32)
        arow = cuda.shared.array(RB, dtype=float32)
        lo = cuda.shared.array(RB, dtype=int64)
        hi = cuda.shared.array(RB, dtype=int64)
        tpage = cuda.shared.array(BK, dtype=int64)  # each tile row's page and slot: one division a key
        tslot = cuda.shared.array(BK, dtype=int64)

        # the keys the block's rows see, [klo, khi): every thread works it out (a few rows)
        klo = S
        khi = int64(0)
        for r in range(nr):
            pos = first + (r0 + r) % L
            top = S - 1
            if causal:
                top = min(top, pos)
            if right >= 0:
                top = min(top, pos + right)
            bottom = int64(0) if left < 0 else max(int64(0), pos - left)
            if bottom <= top:
                klo = min(klo, bottom)
                khi = max(khi, top + 1)
            if tid == 0:  # read after the tile loop's first barrier
                lo[r] = bottom
                hi[r] = top
        chunk = int64(0)
        if khi > klo:
            chunk = ((khi - klo + splits - 1) // splits + 15) // 16 * 16
        s0 = klo + s * chunk
        s1 = min(khi, s0 + chunk)

        scale32 = float32(scale)
        for idx in range(tid, nr * EK, NT):
            r = idx // EK
            e = idx - r * EK
            hq = hk * group + (r0 + r) // L
            qs[r, e] = QLOAD(q[b, hq, (r0 + r) % L, e]) * scale32
        for idx in range(tid, nr * EV, NT):
            r = idx // EV
            acc[r, idx - r * EV] = ZERO
        for r in range(tid, nr, NT):
            mrow[r] = NEG_INF
            lrow[r] = ZERO

        for j0 in range(s0, s1, BK):
            nk = min(BK, s1 - j0)
            cuda.syncthreads()  # the previous tile is used up (and the row state is set)
            for c in range(tid, nk, NT):
                j = j0 + c
                p = j // ps
                tpage[c] = page_table[b, p]
                tslot[c] = j - p * ps
            cuda.syncthreads()
            for idx in range(tid, nk * EK, NT):  # consecutive threads, consecutive entries
                c = idx // EK
                ks[c, idx - c * EK] = LOAD(k_pages[tpage[c], hk, tslot[c], idx - c * EK])
            for idx in range(tid, nk * EV, NT):
                c = idx // EV
                vs[c, idx - c * EV] = LOAD(v_pages[tpage[c], hk, tslot[c], idx - c * EV])
            cuda.syncthreads()
            for idx in range(tid, nr * nk, NT):
                r = idx // nk
                c = idx - r * nk
                x = ZERO
                for e in range(EK):
                    x += qs[r, e] * ks[c, e]
                j = j0 + c
                hq = hk * group + (r0 + r) // L
                pos = first + (r0 + r) % L
                if HAS_SCORE_MOD:
                    x = float32(SCORE_MOD(x, b, hq, pos, j, *mod_args))
                seen = lo[r] <= j and j <= hi[r]
                if HAS_MASK_MOD and seen:
                    seen = MASK_MOD(b, hq, pos, j, *mod_args)
                sc[r, c] = x if seen else NEG_INF
            cuda.syncthreads()
            for r in range(tid, nr, NT):  # online softmax: one thread per row
                mx = NEG_INF
                for c in range(nk):
                    x = sc[r, c]
                    if x > mx or x != x:  # a NaN score wins: the row becomes NaN, as on the cpu
                        mx = x
                mo = mrow[r]
                mn = mx if mx > mo or mx != mx else mo
                sh = mn if mn > NEG_INF else ZERO  # nothing visible yet: -inf stays -inf -> 0
                alpha = math.exp(mo - sh)
                total = ZERO
                for c in range(nk):
                    pr = math.exp(sc[r, c] - sh)
                    sc[r, c] = pr
                    total += pr
                lrow[r] = lrow[r] * alpha + total
                mrow[r] = mn
                arow[r] = alpha
            cuda.syncthreads()
            for idx in range(tid, nr * EV, NT):
                r = idx // EV
                d = idx - r * EV
                a = arow[r]
                pv = ZERO
                for c in range(nk):
                    pr = sc[r, c]
                    # a key of weight 0 adds nothing, even a NaN/inf value (0 * inf is NaN)
                    pv += pr * vs[c, d] if pr != ZERO else ZERO
                # the old terms' weights underflowed: drop them (an inf in them stays out)
                acc[r, d] = (acc[r, d] * a if a != ZERO else ZERO) + pv
        cuda.syncthreads()
        for idx in range(tid, nr * EV, NT):
            r = idx // EV
            d = idx - r * EV
            total = lrow[r]
            if total > ZERO or total != total:
                part_out[s, row0 + r, d] = acc[r, d] * (ONE / total)
            else:
                part_out[s, row0 + r, d] = ZERO
        for r in range(tid, nr, NT):
            total = lrow[r]
            if total > ZERO or total != total:
                part_lse[s, row0 + r] = mrow[r] + math.log(total)
            else:
                part_lse[s, row0 + r] = NEG_INF

    return _decode_split


def merge_kernel_source(out_kind: int):
    """The plain Python function of the split merge, storing float32, float16 or bfloat16 bits.

    ``_merge_splits(part_out, part_lse, out, lse)``: ``part_out`` float32 ``(P, N, Ev)``,
    ``part_lse`` float32 ``(P, N)``, ``out`` ``(N, Ev)`` and ``lse`` ``(N,)`` of the output dtype.
    One thread per element of ``out``; launch with at least ``N * Ev`` threads. Line for line
    ``lse_merge._merge_row``: parts with ``lse_p = -inf`` add nothing, a row empty in every part
    gets zeros and ``-inf``, a NaN or ``+inf`` lse makes the row NaN, a part of weight exactly 0
    is skipped; the parts are summed in split order.
    """
    NEG_INF, ZERO, ONE = _NEG_INF, _ZERO, _ONE
    STORE = _storer(out_kind)

    def _merge_splits(part_out, part_lse, out, lse):
        P = part_out.shape[0]
        N = part_out.shape[1]
        Ev = part_out.shape[2]
        t = cuda.grid(1)
        if t >= N * Ev:
            return
        n = t // Ev
        c = t - n * Ev
        m = NEG_INF
        for p in range(P):
            x = part_lse[p, n]
            if x > m or x != x:  # a NaN sticks: it must not read as "every part empty"
                m = x
        if m == NEG_INF:
            out[n, c] = STORE(ZERO)
            if c == 0:
                lse[n] = STORE(NEG_INF)
            return
        total = ZERO
        for p in range(P):
            total += math.exp(part_lse[p, n] - m)
        inv = ONE / total
        o = ZERO
        for p in range(P):
            w = math.exp(part_lse[p, n] - m) * inv
            if w == ZERO:  # an empty or underflowed part: its (ignored) output must not leak
                continue
            o += w * part_out[p, n, c]
        out[n, c] = STORE(o)
        if c == 0:
            lse[n] = STORE(m + math.log(total))

    return _merge_splits


def write_kernel_source(cache_kind: int, key_kind: int, value_kind: int):
    """The plain Python function of the in-place write of new entries into device caches.

    ``_write_entries(key, value, k_pages, v_pages, page_table, cache_seqlens)``: ``key``
    ``(B, Hkv, L_new, D)`` and ``value`` ``(B, Hkv, L_new, Dv)`` of float32, float16 or bfloat16
    bits (``key_kind``/``value_kind``, any strides) are written to slots ``cache_seqlens[b] ...
    + L_new - 1`` of ``k_pages``/``v_pages`` ``(num_pages, Hkv, page_size, D/Dv)``
    (``cache_kind``), rounded to nearest even (as NumPy/ml_dtypes round on the host). One launch
    writes both caches (one thread per entry of the larger), so a launch that fails writes
    neither. Validation has checked every index and that no two sequences share a slot.
    """
    KLOAD = _loader(key_kind)
    VLOAD = _loader(value_kind)
    STORE = _storer(cache_kind)
    K_SAME = cache_kind == key_kind
    V_SAME = cache_kind == value_kind

    def _write_entries(key, value, k_pages, v_pages, page_table, cache_seqlens):
        B = key.shape[0]
        Hkv = key.shape[1]
        Ln = key.shape[2]
        D = key.shape[3]
        Dv = value.shape[3]
        ps = k_pages.shape[2]
        t = cuda.grid(1)
        if t < B * Hkv * Ln * D:
            e = t % D
            rest = t // D
            i = rest % Ln
            rest //= Ln
            h = rest % Hkv
            b = rest // Hkv
            j = cache_seqlens[b] + i
            p = j // ps
            if K_SAME:  # bits copied as they are (no NaN payload touched)
                k_pages[page_table[b, p], h, j - p * ps, e] = key[b, h, i, e]
            else:
                k_pages[page_table[b, p], h, j - p * ps, e] = STORE(KLOAD(key[b, h, i, e]))
        if t < B * Hkv * Ln * Dv:
            e = t % Dv
            rest = t // Dv
            i = rest % Ln
            rest //= Ln
            h = rest % Hkv
            b = rest // Hkv
            j = cache_seqlens[b] + i
            p = j // ps
            if V_SAME:
                v_pages[page_table[b, p], h, j - p * ps, e] = value[b, h, i, e]
            else:
                v_pages[page_table[b, p], h, j - p * ps, e] = STORE(VLOAD(value[b, h, i, e]))

    return _write_entries


_kernels: dict = {}
_kernels_lock = threading.Lock()


def _cached(key, build):
    with _kernels_lock:
        kern = _kernels.get(key)
        if kern is None:
            kern = _kernels[key] = cuda.jit(build())
        return kern


def decode_kernel(E, Ev, block_rows, block_k, threads, cache_kind, score_mod=None, mask_mod=None, q_kind=CACHE_FLOAT32):
    """The ``cuda.jit`` dispatcher of one ``_decode_split`` specialisation (built once per process)."""
    key = (
        "decode",
        int(E),
        int(Ev),
        int(block_rows),
        int(block_k),
        int(threads),
        int(cache_kind),
        None if score_mod is None else python_function(score_mod),
        None if mask_mod is None else python_function(mask_mod),
        int(q_kind),
    )
    args = (E, Ev, block_rows, block_k, threads, cache_kind, score_mod, mask_mod, q_kind)
    return _cached(key, lambda: decode_kernel_source(*args))


def merge_kernel(out_kind: int):
    """The ``cuda.jit`` dispatcher of ``_merge_splits`` storing ``out_kind``."""
    return _cached(("merge", int(out_kind)), lambda: merge_kernel_source(out_kind))


def write_kernel(cache_kind: int, key_kind: int, value_kind: int):
    """The ``cuda.jit`` dispatcher of ``_write_entries`` for these storage kinds."""
    key = ("write", int(cache_kind), int(key_kind), int(value_kind))
    return _cached(key, lambda: write_kernel_source(cache_kind, key_kind, value_kind))
