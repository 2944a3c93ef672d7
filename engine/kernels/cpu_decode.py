"""The split-KV decoding kernel of the ``cpu`` backend (``engine.attention_with_kvcache``).

One parallel task per (sequence, cache head, block of query rows, key split). A task's rows are
every query head that shares the cache head times every new token (GQA packing: a key tile is read
once for all of them), so a decode step of one token reads each cache entry once. Its keys are
one of ``splits`` equal chunks of the keys its rows can see (split-KV, as FlashAttention's
``num_splits`` and Flash-Decoding): when batch x heads is small against the core count, the
chunks run in parallel, each writes a normalised partial result and its log-sum-exp, and a second
parallel pass merges them exactly with ``lse_merge._merge_row`` (the code behind
``engine.merge_attention``).

Within a task the loop is the forward kernel's online softmax over key tiles with transposed
scores ``st = k_tile @ (scale * q_rows).T`` (BLAS), see ``cpu_flash_fwd``. Caches are pages
``(num_pages, Hkv, page_size, D)`` read through ``page_table``; a contiguous cache is the same with
one page per sequence. A tile never crosses a page: it is used in place when it lies in one page
and has the compute dtype; otherwise (small pages, 16-bit entries given as ``uint16`` bits) it is
gathered, and widened, into a scratch tile that stays in cache.

Non-finite values: a NaN/inf value must reach only the rows that give its key a weight > 0, but
BLAS computes 0 * NaN = NaN. Each tile's product is checked (a pass over the small (rows, Dv)
result, not over V); only a tile whose product is not finite is recomputed exactly, skipping keys of
weight 0. So no call pays a pass over V.
"""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..jit_cache import cache_enabled
from .cpu_flash_fwd import _FM, _cache_tag, _named, no_mask_mod, no_score_mod
from .fastexp import fast_exp
from .half_floats import BFLOAT16_BITS, bf16_bits_to_f32, f16_bits_to_f32
from .lse_merge import _merge_row

_CACHE = cache_enabled()

#: the mods the kernels below call; ``decode_kernel`` re-binds these names for other mods
_SCORE_MOD = no_score_mod
_MASK_MOD = no_mask_mod


def _tile(pages, table, b, h, j0, n, buf, half_kind):
    """Keys (or values) ``j0 ... j0 + n - 1`` of sequence ``b``, head ``h``, as an (n, D) array of
    ``buf``'s dtype: a view of the cache when possible, else gathered (and widened) into ``buf``."""


@overload(_tile, jit_options={"fastmath": _FM})
def _tile_overload(pages, table, b, h, j0, n, buf, half_kind):
    if isinstance(pages.dtype, types.Float):
        def same_dtype(pages, table, b, h, j0, n, buf, half_kind):
            ps = pages.shape[2]
            D = pages.shape[3]
            p = j0 // ps
            off = j0 - p * ps
            if off + n <= ps:
                return pages[table[b, p], h, off:off + n]
            out = buf[:n * D].reshape((n, D))
            t = 0
            while t < n:
                p = (j0 + t) // ps
                off = j0 + t - p * ps
                m = min(n - t, ps - off)
                out[t:t + m] = pages[table[b, p], h, off:off + m]
                t += m
            return out
        return same_dtype

    if pages.dtype == types.uint16:
        def widened(pages, table, b, h, j0, n, buf, half_kind):
            ps = pages.shape[2]
            D = pages.shape[3]
            out = buf[:n * D].reshape((n, D))
            flat = buf[:n * D]
            t = 0
            while t < n:
                p = (j0 + t) // ps
                off = j0 + t - p * ps
                m = min(n - t, ps - off)
                src = pages[table[b, p], h, off:off + m].reshape(m * D)
                dst = flat[t * D:(t + m) * D]
                if half_kind == BFLOAT16_BITS:
                    for x in range(m * D):
                        dst[x] = bf16_bits_to_f32(src[x])
                else:
                    for x in range(m * D):
                        dst[x] = f16_bits_to_f32(src[x])
                t += m
            return out
        return widened
    return None


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _decode_task(task, q, k_pages, v_pages, page_table, seqlens_k, causal, left, right, scale, group,
                 half_kind, splits, block_k, block_rows, mod_args, has_score_mod, has_mask_mod,
                 part_out, part_lse):
    """One task: rows ``r0 ... r1 - 1`` of (sequence b, cache head hk), keys of split ``s``."""
    B, Hq, L, E = q.shape
    Hkv = k_pages.shape[1]
    Ev = v_pages.shape[3]
    dt = q.dtype
    R = group * L
    nrb = (R + block_rows - 1) // block_rows
    s = task % splits
    rest = task // splits
    rb = rest % nrb
    rest //= nrb
    hk = rest % Hkv
    b = rest // Hkv
    r0 = rb * block_rows
    nr = min(block_rows, R - r0)
    consts = np.array([-np.inf, 0.0], dtype=dt)  # typed constants: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    S = seqlens_k[b]
    first = S - L  # position of query row 0 in its sequence
    row0 = (b * Hq + hk * group) * L + r0  # flattened (b, head, token) of this task's row 0

    # each row's query head, position and visible key range [lo, hi]
    hq = np.empty(nr, dtype=np.int64)
    pos = np.empty(nr, dtype=np.int64)
    lo = np.empty(nr, dtype=np.int64)
    hi = np.empty(nr, dtype=np.int64)
    klo, khi = S, 0
    full_lo, full_hi = 0, S
    for r in range(nr):
        hq[r] = hk * group + (r0 + r) // L
        pos[r] = first + (r0 + r) % L
        top = S - 1
        if causal:
            top = min(top, pos[r])
        if right >= 0:
            top = min(top, pos[r] + right)
        bottom = 0 if left < 0 else max(0, pos[r] - left)
        lo[r] = bottom
        hi[r] = top
        if bottom <= top:
            klo = min(klo, bottom)
            khi = max(khi, top + 1)
        full_lo = max(full_lo, bottom)
        full_hi = min(full_hi, top + 1)
    chunk = 0
    if khi > klo:
        chunk = ((khi - klo + splits - 1) // splits + 15) // 16 * 16
    s0 = klo + s * chunk
    s1 = min(khi, s0 + chunk)

    qt = np.empty(E * nr, dtype=dt)  # (scale * q_rows).T, (E, nr)
    for r in range(nr):
        i = (r0 + r) % L
        for e in range(E):
            qt[e * nr + r] = q[b, hq[r], i, e] * scale
    qtv = qt.reshape((E, nr))
    kbuf = np.empty(block_k * E, dtype=dt)
    vbuf = np.empty(block_k * Ev, dtype=dt)
    st_buf = np.empty(block_k * nr, dtype=dt)
    pv = np.empty((nr, Ev), dtype=dt)
    acc = np.zeros((nr, Ev), dtype=dt)
    m = np.full(nr, neg_inf, dtype=dt)
    l = np.zeros(nr, dtype=dt)
    tm = np.empty(nr, dtype=dt)
    shift = np.empty(nr, dtype=dt)
    alpha = np.empty(nr, dtype=dt)
    ts = np.empty(nr, dtype=dt)
    j0 = s0
    while j0 < s1:
        nk = min(block_k, s1 - j0)
        kt = _tile(k_pages, page_table, b, hk, j0, nk, kbuf, half_kind)
        st = st_buf[:nk * nr].reshape((nk, nr))
        np.dot(kt, qtv, st)
        if has_score_mod:
            for c in range(nk):
                for r in range(nr):
                    st[c, r] = _SCORE_MOD(st[c, r], b, hq[r], pos[r], j0 + c, *mod_args)
        tm[:] = neg_inf
        if has_mask_mod or j0 < full_lo or j0 + nk > full_hi:  # some rows cannot see some keys
            for c in range(nk):
                j = j0 + c
                for r in range(nr):
                    seen = lo[r] <= j and j <= hi[r]
                    if has_mask_mod and seen:
                        seen = _MASK_MOD(b, hq[r], pos[r], j, *mod_args)
                    x = st[c, r] if seen else neg_inf
                    st[c, r] = x
                    tm[r] = x if x > tm[r] else tm[r]
        else:
            for c in range(nk):
                for r in range(nr):
                    x = st[c, r]
                    tm[r] = x if x > tm[r] else tm[r]
        # online softmax: a row with nothing visible yet shifts by 0 (its -inf stays -inf -> 0)
        rescale = False
        for r in range(nr):
            mo = m[r]
            mn = tm[r] if tm[r] > mo else mo
            sh = mn if mn > neg_inf else zero
            a = fast_exp(mo - sh)
            shift[r] = sh
            alpha[r] = a
            m[r] = mn
            ts[r] = zero
            rescale |= a != 1.0
        for c in range(nk):
            for r in range(nr):
                p = fast_exp(st[c, r] - shift[r])
                st[c, r] = p
                ts[r] += p
        for r in range(nr):
            l[r] = l[r] * alpha[r] + ts[r]
        vt = _tile(v_pages, page_table, b, hk, j0, nk, vbuf, half_kind)
        np.dot(st.T, vt, pv)
        finite = True
        for r in range(nr):
            for c in range(Ev):
                finite &= math.isfinite(pv[r, c])
        if not finite:  # a NaN/inf value: recompute exactly, keys of weight 0 left out
            for r in range(nr):
                for c in range(Ev):
                    total = zero
                    for kk in range(nk):
                        p = st[kk, r]
                        if p > zero or p != p:
                            total += p * vt[kk, c]
                    pv[r, c] = total
        if rescale:
            for r in range(nr):
                a = alpha[r]
                for c in range(Ev):
                    acc[r, c] = acc[r, c] * a + pv[r, c]
        else:
            for r in range(nr):
                for c in range(Ev):
                    acc[r, c] += pv[r, c]
        j0 += nk
    for r in range(nr):
        total = l[r]
        n = row0 + r
        if total > 0.0 or total != total:
            inv = 1.0 / total
            for c in range(Ev):
                part_out[s, n, c] = acc[r, c] * inv
            part_lse[s, n] = m[r] + np.log(total)
        else:
            for c in range(Ev):
                part_out[s, n, c] = zero
            part_lse[s, n] = neg_inf


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _decode(q, k_pages, v_pages, page_table, seqlens_k, causal, left, right, scale, group, half_kind,
            splits, block_k, block_rows, mod_args, has_score_mod, has_mask_mod, part_out, part_lse, out, lse):
    """Attention of ``q`` (B, Hq, L, E) against the first ``seqlens_k[b]`` keys of each sequence.

    ``k_pages``/``v_pages`` (num_pages, Hkv, page_size, E/Ev): the compute dtype (q's: float32 or
    float64) or ``uint16`` bits of float16/bfloat16 (``half_kind``); ``page_table`` (B, max_pages)
    int32. Row i of sequence b is at position ``seqlens_k[b] - L + i``; ``causal`` (bottom right) and
    the window ``left``/``right`` (-1: unbounded) limit the keys it sees; the mods see absolute
    positions. ``part_out`` (splits, B*Hq*L, Ev) and ``part_lse`` (splits, B*Hq*L) receive each
    split's normalised partial result; with ``splits > 1`` they are merged into ``out`` (B*Hq*L, Ev)
    and ``lse`` (B*Hq*L,); with one split, pass ``out``/``lse`` reshaped as the parts.
    """
    B, Hq, L, E = q.shape
    Hkv = k_pages.shape[1]
    nrb = (group * L + block_rows - 1) // block_rows
    for task in prange(B * Hkv * nrb * splits):
        _decode_task(task, q, k_pages, v_pages, page_table, seqlens_k, causal, left, right, scale, group,
                     half_kind, splits, block_k, block_rows, mod_args, has_score_mod, has_mask_mod,
                     part_out, part_lse)
    if splits > 1:
        for n in prange(out.shape[0]):
            _merge_row(part_out, part_lse, n, out, lse)


_with_mods: dict = {}


def decode_kernel(score_mod, mask_mod):
    """The kernel for these mods (``None`` for none): ``_decode`` itself without mods, else the same
    code with ``_SCORE_MOD``/``_MASK_MOD`` bound to them, built once per process per pair and
    disk-cached for the engine's and built-in variants' mods (see ``cpu_flash_fwd.flash_kernel``)."""
    if score_mod is None and mask_mod is None:
        return _decode
    key = (score_mod, mask_mod)
    if key not in _with_mods:
        tag = _cache_tag(score_mod, mask_mod)
        cache = {"cache": True} if tag else {}
        env = dict(globals(), _SCORE_MOD=score_mod or no_score_mod, _MASK_MOD=mask_mod or no_mask_mod)
        task = njit(fastmath=_FM, error_model="numpy", **cache)(
            _named(_decode_task.py_func.__code__, env, "_decode_task_mods", tag))
        env = dict(globals(), _decode_task=task)
        _with_mods[key] = njit(parallel=True, fastmath=_FM, error_model="numpy", **cache)(
            _named(_decode.py_func.__code__, env, "_decode_mods", tag))
    return _with_mods[key]
