"""The split-KV decoding kernel of the ``cpu`` backend (``engine.attention_with_kvcache``).

One parallel task per (sequence, cache head, block of query rows, key split). A task's rows are
every query head that shares the cache head times every new token (GQA packing: a key tile is read
once for all of them), so a decode step of one token reads each cache entry once. Its keys are
one of ``splits`` equal chunks of the keys its rows can see (split-KV, as FlashAttention's
``num_splits`` and Flash-Decoding): when batch x heads is small against the core count, the
chunks run in parallel, each writes a normalised partial result and its log-sum-exp, and a second
parallel pass merges them exactly with ``lse_merge._merge_row`` (the code behind
``engine.merge_attention``).

Within a task the loop is the forward kernel's online softmax over key tiles, with the scores
``st = (scale * q_rows) @ k_tile.T`` kept row-major: a task has few rows (one per query head of
the group when decoding), so the max, exp and sum passes run along contiguous keys, where they
vectorise (the forward kernel's transposed layout suits its 128-row tiles instead). Caches are pages
``(num_pages, Hkv, page_size, D)`` read through ``page_table``; a contiguous cache is the same with
one page per sequence; 16-bit entries arrive as ``uint16`` bits.

Decoding is a stream through the cache, so the kernel reads each cache row once, in place: a task
of at most ``fused_rows`` rows computes its dot products and weighted sums itself, row by row of
the cache, widening 16-bit entries in registers (half the bytes read; no copy of paged or 16-bit
tiles), and skips keys of weight 0 (so a NaN/inf value reaches only the rows that weigh it).
Tasks with more rows (chunked prefill, wide GQA groups) gather each tile when needed and use BLAS,
whose product is checked for non-finite values afterwards (``nonfinite``). No call pays a pass
over V.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ...runtime.jit_cache import cache_enabled
from ..fastexp import fast_exp
from ..identity_mods import no_mask_mod, no_score_mod
from ..lse_merge import _merge_row
from ..mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop, row_types
from ..mod_kernels import ModKernels
from .half_floats import BFLOAT16_BITS, bf16_bits_to_f32, f16_bits_to_f32
from .mod_loops import mask_keys, score_keys
from .nonfinite import redo_if_nonfinite
from .tile_ops import _FM

_CACHE = cache_enabled()


class DecodeArgs(NamedTuple):
    """Everything the decode kernel reads but the mods' arguments, built in one place (the ``cpu``
    backend's decode op); see :func:`_decode` for what each field holds."""

    q: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    page_table: np.ndarray
    seqlens_k: np.ndarray
    causal: bool
    left: int
    right: int
    scale: float
    group: int
    half_kind: int
    gather: bool
    splits: int
    block_k: int
    block_rows: int
    fused_rows: int
    has_score_mod: bool
    has_mask_mod: bool
    part_out: np.ndarray
    part_lse: np.ndarray
    out: np.ndarray
    lse: np.ndarray


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
                return pages[table[b, p], h, off : off + n]
            out = buf[: n * D].reshape((n, D))
            t = 0
            while t < n:
                p = (j0 + t) // ps
                off = j0 + t - p * ps
                m = min(n - t, ps - off)
                src = pages[table[b, p], h]
                for i in range(m):  # not out[t : t + m] = ...: that compiles a shape error's
                    for d in range(D):  # message (3-5 s of the task's first compile)
                        out[t + i, d] = src[off + i, d]
                t += m
            return out

        return same_dtype

    if pages.dtype == types.uint16:

        def widened(pages, table, b, h, j0, n, buf, half_kind):
            ps = pages.shape[2]
            D = pages.shape[3]
            out = buf[: n * D].reshape((n, D))
            flat = buf[: n * D]
            t = 0
            while t < n:
                p = (j0 + t) // ps
                off = j0 + t - p * ps
                m = min(n - t, ps - off)
                src = pages[table[b, p], h, off : off + m].reshape(m * D)
                dst = flat[t * D : (t + m) * D]
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


def _scores_fused(pages, table, b, h, j0, nk, qs, st, half_kind):
    """``st[r, c] = qs[r] . key (j0 + c)`` of sequence b, head h: each cache row read once, in
    place, through the page table (16-bit rows widened in registers)."""


def _values_fused(pages, table, b, h, j0, nk, st, pv, half_kind):
    """``pv[r] = sum_c st[r, c] * value (j0 + c)``, each value row read once in place. Keys of
    weight 0 are skipped, so a NaN/inf value reaches exactly the rows that weigh it (a NaN weight
    is not 0: it reaches its row)."""


def _fused_impls(widen):
    """The two loops above for cache rows converted by ``widen`` (identity for float caches).
    Each page run is one 2-D view; the innermost loops run along the head dimension and vectorise."""

    def scores(pages, table, b, h, j0, nk, qs, st, half_kind):
        ps, D = pages.shape[2], pages.shape[3]
        zero = qs.dtype.type(0)
        c = 0
        while c < nk:  # one run of keys per page
            p = (j0 + c) // ps
            off = j0 + c - p * ps
            m = min(nk - c, ps - off)
            blk = pages[table[b, p], h]
            for cc in range(m):
                for r in range(qs.shape[0]):
                    total = zero
                    for d in range(D):
                        total += widen(blk[off + cc, d]) * qs[r, d]
                    st[r, c + cc] = total
            c += m

    def values(pages, table, b, h, j0, nk, st, pv, half_kind):
        ps, D = pages.shape[2], pages.shape[3]
        pv[:] = 0
        c = 0
        while c < nk:
            p = (j0 + c) // ps
            off = j0 + c - p * ps
            m = min(nk - c, ps - off)
            blk = pages[table[b, p], h]
            for cc in range(m):
                for r in range(st.shape[0]):
                    w = st[r, c + cc]
                    if w != 0:
                        for d in range(D):
                            pv[r, d] += w * widen(blk[off + cc, d])
            c += m

    return njit(inline="always", fastmath=_FM, error_model="numpy")(scores), njit(
        inline="always", fastmath=_FM, error_model="numpy"
    )(values)


@njit(inline="always")
def _same(x):
    return x


_FLOAT, _BF16, _F16 = _fused_impls(_same), _fused_impls(bf16_bits_to_f32), _fused_impls(f16_bits_to_f32)


@overload(_scores_fused, jit_options={"fastmath": _FM, "error_model": "numpy"})
def _scores_fused_overload(pages, table, b, h, j0, nk, qs, st, half_kind):
    if isinstance(pages.dtype, types.Float):
        same = _FLOAT[0]

        def floats(pages, table, b, h, j0, nk, qs, st, half_kind):
            same(pages, table, b, h, j0, nk, qs, st, half_kind)

        return floats
    if pages.dtype == types.uint16:
        bf16, f16 = _BF16[0], _F16[0]

        def bits(pages, table, b, h, j0, nk, qs, st, half_kind):
            if half_kind == BFLOAT16_BITS:
                bf16(pages, table, b, h, j0, nk, qs, st, half_kind)
            else:
                f16(pages, table, b, h, j0, nk, qs, st, half_kind)

        return bits
    return None


@overload(_values_fused, jit_options={"fastmath": _FM, "error_model": "numpy"})
def _values_fused_overload(pages, table, b, h, j0, nk, st, pv, half_kind):
    if isinstance(pages.dtype, types.Float):
        same = _FLOAT[1]

        def floats(pages, table, b, h, j0, nk, st, pv, half_kind):
            same(pages, table, b, h, j0, nk, st, pv, half_kind)

        return floats
    if pages.dtype == types.uint16:
        bf16, f16 = _BF16[1], _F16[1]

        def bits(pages, table, b, h, j0, nk, st, pv, half_kind):
            if half_kind == BFLOAT16_BITS:
                bf16(pages, table, b, h, j0, nk, st, pv, half_kind)
            else:
                f16(pages, table, b, h, j0, nk, st, pv, half_kind)

        return bits
    return None


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _decode_task(task, args, mod_args):
    """One task: rows ``r0 ... r1 - 1`` of (sequence b, cache head hk), keys of split ``s``."""
    B, Hq, L, E = args.q.shape
    Hkv = args.k_pages.shape[1]
    Ev = args.v_pages.shape[3]
    dt = args.q.dtype
    R = args.group * L
    nrb = (R + args.block_rows - 1) // args.block_rows
    s = task % args.splits
    rest = task // args.splits
    rb = rest % nrb
    rest //= nrb
    hk = rest % Hkv
    b = rest // Hkv
    r0 = rb * args.block_rows
    nr = min(args.block_rows, R - r0)
    consts = np.array([-np.inf, 0.0], dtype=dt)  # typed constants: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    S = args.seqlens_k[b]
    first = S - L  # position of query row 0 in its sequence
    row0 = (b * Hq + hk * args.group) * L + r0  # flattened (b, head, token) of this task's row 0

    # each row's query head, position and visible key range [lo, hi]
    rows = np.empty(4 * nr, dtype=np.int64)
    hq = rows[:nr]
    pos = rows[nr : 2 * nr]
    lo = rows[2 * nr : 3 * nr]
    hi = rows[3 * nr :]
    klo, khi = S, 0
    full_lo, full_hi = 0, S
    for r in range(nr):
        hq[r] = hk * args.group + (r0 + r) // L
        pos[r] = first + (r0 + r) % L
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
    chunk = 0
    if khi > klo:
        chunk = ((khi - klo + args.splits - 1) // args.splits + 15) // 16 * 16
    s0 = klo + s * chunk
    s1 = min(khi, s0 + chunk)

    # one scratch allocation per task: scaled query rows, key/value tiles, scores, row state
    # (tiles are views of a contiguous same-dtype cache: no tile scratch; a fresh allocation past
    # malloc's mmap threshold would cost page faults on every task)
    tile_rows = args.block_k if args.gather and nr > args.fused_rows else 0
    sizes = (nr * E, tile_rows * E, tile_rows * Ev, nr * args.block_k, nr * Ev, nr * Ev)
    scratch = np.empty(sum(sizes) + 3 * nr, dtype=dt)
    o = 0
    qs = scratch[o : o + nr * E].reshape((nr, E))
    o += nr * E
    kbuf = scratch[o : o + tile_rows * E]
    o += tile_rows * E
    vbuf = scratch[o : o + tile_rows * Ev]
    o += tile_rows * Ev
    st_buf = scratch[o : o + nr * args.block_k]
    o += nr * args.block_k
    pv = scratch[o : o + nr * Ev].reshape((nr, Ev))
    o += nr * Ev
    acc = scratch[o : o + nr * Ev].reshape((nr, Ev))
    o += nr * Ev
    m = scratch[o : o + nr]
    lsum = scratch[o + nr : o + 2 * nr]  # running sum per row
    alpha = scratch[o + 2 * nr : o + 3 * nr]
    acc[:] = zero
    m[:] = neg_inf
    lsum[:] = zero
    for r in range(nr):
        i = (r0 + r) % L
        for e in range(E):
            qs[r, e] = args.q[b, hq[r], i, e] * args.scale
    j0 = s0
    while j0 < s1:
        nk = min(args.block_k, s1 - j0)
        # scores row-major (nr, nk): every pass below runs along contiguous keys and vectorises
        # (decode has few rows, often one)
        st = st_buf[: nr * nk].reshape((nr, nk))
        fused = nr <= args.fused_rows
        if fused:  # few rows: dot products straight from the cache pages, 16-bit entries widened
            _scores_fused(args.k_pages, args.page_table, b, hk, j0, nk, qs, st, args.half_kind)
        else:
            kt = _tile(args.k_pages, args.page_table, b, hk, j0, nk, kbuf, args.half_kind)
            np.dot(qs, kt.T, st)
        masked = args.has_mask_mod or j0 < full_lo or j0 + nk > full_hi  # some rows miss some keys
        for r in range(nr):
            row = st[r]
            # the mods' loops, by address (engine.kernels.mod_calls):
            # loop 0 runs the score_mod, 1 the mask_mod
            b_, h_, q_, k_ = np.int64(b), np.int64(hq[r]), np.int64(pos[r]), np.int64(j0)
            if args.has_score_mod and not mod_loop(0, mod_args, row, b_, h_, q_, k_, mod_args):
                raise RuntimeError(MOD_CALL_MISMATCH)
            if masked:
                a, z = lo[r] - j0, hi[r] - j0  # visible columns a..z of this tile
                for c in range(nk):
                    row[c] = row[c] if a <= c and c <= z else neg_inf
                c0, c1 = np.int64(max(a, 0)), np.int64(min(z + 1, nk))
                if args.has_mask_mod and c0 < c1 and not mod_loop(1, mod_args, row, b_, h_, q_, k_, c0, c1, mod_args):
                    raise RuntimeError(MOD_CALL_MISMATCH)
            mx = neg_inf
            for c in range(nk):
                x = row[c]
                mx = x if x > mx or x != x else mx  # a NaN score wins: the row becomes NaN
            # online softmax: a row with nothing visible yet shifts by 0 (its -inf stays -inf -> 0)
            mo = m[r]
            mn = mx if mx > mo or mx != mx else mo
            sh = mn if mn > neg_inf else zero
            alpha[r] = fast_exp(mo - sh)
            m[r] = mn
            total = zero
            for c in range(nk):
                p = fast_exp(row[c] - sh)
                row[c] = p
                total += p
            lsum[r] = lsum[r] * alpha[r] + total
        if fused:  # keys of weight 0 are skipped: a NaN/inf value reaches only rows that weigh it
            _values_fused(args.v_pages, args.page_table, b, hk, j0, nk, st, pv, args.half_kind)
        else:
            vt = _tile(args.v_pages, args.page_table, b, hk, j0, nk, vbuf, args.half_kind)
            np.dot(st, vt, pv)
            redo_if_nonfinite(st, vt, pv)  # a NaN/inf value reaches only rows that weigh it
        for r in range(nr):
            a = alpha[r]
            if a == zero:  # the old terms' weights underflowed: drop them (an inf stays out)
                for c in range(Ev):
                    acc[r, c] = pv[r, c]
                continue
            for c in range(Ev):
                acc[r, c] = acc[r, c] * a + pv[r, c]
        j0 += nk
    for r in range(nr):
        total = lsum[r]
        n = row0 + r
        if total > 0.0 or total != total:
            inv = 1.0 / total
            for c in range(Ev):
                args.part_out[s, n, c] = acc[r, c] * inv
            args.part_lse[s, n] = m[r] + np.log(total)
        else:
            for c in range(Ev):
                args.part_out[s, n, c] = zero
            args.part_lse[s, n] = neg_inf


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _decode(args, mod_args):
    """Attention of ``q`` (B, Hq, L, E) against the first ``seqlens_k[b]`` keys of each sequence,
    with ``args`` a :class:`DecodeArgs` (the fields below) and ``mod_args`` the mods' arguments.

    ``k_pages``/``v_pages`` (num_pages, Hkv, page_size, E/Ev): the compute dtype (q's: float32 or
    float64) or ``uint16`` bits of float16/bfloat16 (``half_kind``); ``page_table`` (B, max_pages)
    int32; ``gather``: whether a tile may need copying (16-bit entries, or pages a tile can cross;
    False only for a contiguous cache of the compute dtype). Tasks of at most ``fused_rows`` rows
    compute their products in the kernel from the cache rows in place, larger ones with BLAS on
    (gathered) tiles. Row i of sequence b is
    at position ``seqlens_k[b] - L + i``; ``causal`` (bottom right) and
    the window ``left``/``right`` (-1: unbounded) limit the keys it sees; the mods see absolute
    positions. ``part_out`` (splits, B*Hq*L, Ev) and ``part_lse`` (splits, B*Hq*L) receive each
    split's normalised partial result; with ``splits > 1`` they are merged into ``out`` (B*Hq*L, Ev)
    and ``lse`` (B*Hq*L,); with one split, pass ``out``/``lse`` reshaped as the parts.
    """
    B, Hq, L, E = args.q.shape
    Hkv = args.k_pages.shape[1]
    nrb = (args.group * L + args.block_rows - 1) // args.block_rows
    for task in prange(B * Hkv * nrb * args.splits):
        # the index is int64 when typed, uint64 when lowered: one type, one compilation of the task
        _decode_task(np.int64(task), args, mod_args)
    if args.splits > 1:
        for n in prange(args.out.shape[0]):
            _merge_row(args.part_out, args.part_lse, n, args.out, args.lse)


_OPTIONS = dict(fastmath=_FM, error_model="numpy")
_kernels = ModKernels(
    _decode,
    _decode_task,
    {"_SCORE_MOD": no_score_mod, "_MASK_MOD": no_mask_mod},
    _OPTIONS,
    # the types the driver calls the task with (engine.kernels.task_pointer)
    task_types=lambda args, mod_args: (types.int64, args, mod_args),
    loops=(
        ModLoop(score_keys, ("_SCORE_MOD",), lambda args, mod_args: row_types(args, "q", 4, mod_args)),
        ModLoop(mask_keys, ("_MASK_MOD",), lambda args, mod_args: row_types(args, "q", 6, mod_args)),
    ),
)
_with_mods = _kernels.built


def decode_kernel(score_mod, mask_mod, serial=False):
    """The kernel for these mods (``None`` for none): ``_decode`` over its task, the same for every
    pair, which calls the mods' loops by address (``engine.kernels.mod_kernels``).
    ``serial=True``: the same code compiled without ``parallel``, for calls too small to wake the
    thread pool for."""
    return _kernels(score_mod, mask_mod, serial=serial)
