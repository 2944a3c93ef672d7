"""The ragged attention kernel of the ``cpu`` backend: packed query rows of B sequences of different
lengths, each against its own keys, read through pages. It runs
``engine.attention_with_kvcache(..., cu_seqlens_q=)`` (decode steps and prefill chunks mixed in one
call, against a contiguous or paged cache) and the packed batches of ``engine.varlen_attention``
that ``varlen_flash`` (the dense forward's tiles) does not take: decode-like ones (keys read in
place, one per page), those it splits across threads by keys, and ``E = 0`` (the keys of the
batch as one head-major page).

Sequence b owns query rows ``q_start[b] ... q_start[b+1] - 1`` of the packed ``q`` (total, Hq, E)
and attends its ``seqlens_k[b]`` keys; key j of sequence b lives in page
``page_table[b, (k_base[b] + j) // page_size]`` at slot ``(k_base[b] + j) % page_size`` (a paged
cache: ``k_base = 0``; a packed batch laid out head-major as one page: ``k_base = cu_seqlens_k``).
Row i of sequence b is the token at position ``seqlens_k[b] - L_b + i`` (bottom-right alignment),
which ``causal``, the window and the mods see, as in the decode kernel.

One task per (sequence, key/value head, block of rows, key split), with the decode kernel's task
layout and tile loop: a task's rows are every query head of the group times the sequence's tokens
(GQA packing: each key tile read once for the group), its keys one of ``splits`` chunks of the
keys its rows can see (split-KV, merged exactly by ``lse_merge._merge_row``), and within the
task the online softmax runs over row-major key tiles. Tasks of at most ``fused_rows`` rows read
each cache row once in place (``decode._scores_fused``/``_values_fused``); larger ones take the
tile products through the GEMM provider (``gemm.tile_gemm``: MKL or OpenBLAS by pointer, or
``np.dot``), on views of the page or gathered tiles.

The cost is proportional to the rows times the keys each row sees, whatever the lengths: tasks
differ a lot in size (a 512-token prefill beside one decode step), so the driver orders them by
estimated cost, largest first, and deals them to the threads in a snake order (0, 1, ..., T-1,
T-1, ..., 0, ...), a list per thread: the threads finish together instead of the one that drew
the long sequence finishing last. No result depends on this order (each task writes its own rows).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types

from ...runtime.jit_cache import cache_enabled
from ..fastexp import fast_exp
from ..identity_mods import no_mask_mod, no_score_mod
from ..lse_merge import _merge_row
from ..mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop, row_types
from ..mod_kernels import ModKernels
from ..task_pointer import field_dtype, return_types, vector
from .decode import _scores_fused, _tile, _values_fused
from .gemm import tile_gemm
from .mod_loops import mask_keys, score_keys
from .nonfinite import redo_if_nonfinite
from .tile_ops import _FM

_CACHE = cache_enabled()

#: the scheduler's fixed cost of one task, in the units of its estimate (rows x keys): scratch,
#: the query rows and the output rows cost about as much as this many scores
_TASK_OVERHEAD = 256


class VarlenArgs(NamedTuple):
    """Everything the kernel reads but the mods' arguments, built in one place (the ``cpu``
    backend's varlen and packed-decode ops); see the module docstring for the layout."""

    q: np.ndarray
    q_start: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    page_table: np.ndarray
    k_base: np.ndarray
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
    threads: int
    gemm_kind: int
    gemm_fn: int
    part_out: np.ndarray
    part_lse: np.ndarray
    out: np.ndarray
    lse: np.ndarray


@njit(cache=_CACHE, inline="always")
def _visible(pos, S, causal, left, right):
    """``(lo, hi)``: the keys ``lo ... hi`` the token at ``pos`` sees among ``S`` (empty if lo > hi)."""
    hi = S - 1
    if causal:
        hi = min(hi, pos)
    if right >= 0:
        hi = min(hi, pos + right)
    lo = 0 if left < 0 else max(0, pos - left)
    return lo, hi


_LANES = 16


@njit(cache=_CACHE, fastmath=_FM, inline="always")
def _row_max(row, neg_inf, part):
    """The largest non-NaN entry of ``row`` (-inf if none), as ``_LANES`` running maxima combined
    at the end: a select per lane vectorises, where one running maximum stays scalar (4x here)."""
    n = row.shape[0]
    part[:] = neg_inf
    c = 0
    while c + _LANES <= n:
        for u in range(_LANES):
            x = row[c + u]
            part[u] = x if x > part[u] else part[u]
        c += _LANES
    mx = neg_inf
    for u in range(_LANES):
        mx = part[u] if part[u] > mx else mx
    while c < n:
        mx = row[c] if row[c] > mx else mx
        c += 1
    return mx


@njit(cache=_CACHE)
def deal(cost, per_base, threads):
    """``(order, bin_start)``: tasks ``x * per_base ... x * per_base + per_base - 1`` cost
    ``cost[x]`` each; they are dealt, most costly first, to at most ``threads`` threads in a snake
    order (0, 1, ..., T-1, T-1, ..., 0, ...). Thread t runs ``order[bin_start[t] ... bin_start[t+1]
    - 1]``. The deal is the same on every run (a stable sort)."""
    n = cost.shape[0] * per_base
    threads = max(1, min(threads, n))
    by_cost = np.argsort(-cost, kind="mergesort")
    owner = np.empty(n, np.int64)
    x = 0
    for base in by_cost:
        for t in range(per_base):
            turn, seat = x // threads, x % threads
            owner[base * per_base + t] = seat if turn % 2 == 0 else threads - 1 - seat
            x += 1
    bin_start = np.zeros(threads + 1, np.int64)
    for t in range(n):
        bin_start[owner[t] + 1] += 1
    for t in range(threads):
        bin_start[t + 1] += bin_start[t]
    fill = bin_start[:-1].copy()
    order = np.empty(n, np.int64)
    for base in by_cost:
        for t in range(per_base):
            task = base * per_base + t
            order[fill[owner[task]]] = task
            fill[owner[task]] += 1
    return order, bin_start


@njit(cache=_CACHE)
def _schedule(args):
    """``(task_b, task_r0, order, bin_start)``: the (sequence, first row) of every block of rows,
    and the tasks dealt to ``bin_start.shape[0] - 1`` threads (``args.threads``, at most one a
    task): thread t runs tasks
    ``order[bin_start[t] ... bin_start[t+1] - 1]``. Task ``((base * Hkv) + hk) * splits + s`` is
    block ``base`` of key/value head ``hk``, key split ``s``."""
    B = args.q_start.shape[0] - 1
    Hkv = args.k_pages.shape[1]
    nb = 0
    for b in range(B):
        R = args.group * (args.q_start[b + 1] - args.q_start[b])
        nb += (R + args.block_rows - 1) // args.block_rows
    task_b = np.empty(nb, np.int64)
    task_r0 = np.empty(nb, np.int64)
    cost = np.empty(nb, np.float64)
    x = 0
    for b in range(B):
        L = args.q_start[b + 1] - args.q_start[b]
        S = args.seqlens_k[b]
        R = args.group * L
        for r0 in range(0, R, args.block_rows):
            r1 = min(r0 + args.block_rows, R)
            i0, i1 = r0 % L, (r1 - 1) % L
            if r1 - r0 >= L or i1 < i0:  # rows of more than one head: every token
                i0, i1 = 0, L - 1
            lo, _ = _visible(S - L + i0, S, args.causal, args.left, args.right)
            _, hi = _visible(S - L + i1, S, args.causal, args.left, args.right)
            task_b[x] = b
            task_r0[x] = r0
            cost[x] = (r1 - r0) * max(0, hi + 1 - lo) / args.splits + _TASK_OVERHEAD
            x += 1
    order, bin_start = deal(cost, Hkv * args.splits, args.threads)
    return task_b, task_r0, order, bin_start


@njit(cache=_CACHE, inline="always")
def _scratch_size(args, E, Ev):
    """Floats of one thread's scratch (:func:`_varlen_task`'s buffers at ``block_rows`` rows)."""
    nr = args.block_rows
    tile_rows = args.block_k if args.gather and nr > args.fused_rows else 0
    return nr * E + tile_rows * (E + Ev) + nr * args.block_k + 2 * nr * Ev + 3 * nr + _LANES


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _varlen_task(task, task_b, task_r0, scratch, rows, args, mod_args):
    """One task: a block of rows of (sequence b, key/value head hk), keys of split ``s``, in the
    thread's ``scratch`` (floats, :func:`_scratch_size`) and ``rows`` (int64, 5 x block_rows)
    buffers, reused by every task of the thread (a fresh allocation past malloc's mmap threshold
    would cost page faults on every task)."""
    Hq, E = args.q.shape[1], args.q.shape[2]
    Hkv = args.k_pages.shape[1]
    Ev = args.v_pages.shape[3]
    dt = args.q.dtype
    s = task % args.splits
    rest = task // args.splits
    hk = rest % Hkv
    base = rest // Hkv
    b = task_b[base]
    r0 = task_r0[base]
    q0 = args.q_start[b]
    L = args.q_start[b + 1] - q0
    nr = min(args.block_rows, args.group * L - r0)
    consts = np.array([-np.inf, 0.0], dtype=dt)  # typed constants: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    S = args.seqlens_k[b]
    kb = args.k_base[b]  # key j is slot kb + j of the sequence's page-table row

    # each row's query head, token, position and visible key range [lo, hi]
    hq = rows[:nr]
    tok = rows[nr : 2 * nr]
    pos = rows[2 * nr : 3 * nr]
    lo = rows[3 * nr : 4 * nr]
    hi = rows[4 * nr :]
    klo, khi = S, 0
    full_lo, full_hi = 0, S
    for r in range(nr):
        hq[r] = hk * args.group + (r0 + r) // L
        tok[r] = (r0 + r) % L
        pos[r] = S - L + tok[r]
        bottom, top = _visible(pos[r], S, args.causal, args.left, args.right)
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

    # the thread's scratch, cut for this task (tiles are views of the page when they can be)
    fused = nr <= args.fused_rows
    tile_rows = args.block_k if args.gather and not fused else 0
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
    lsum = scratch[o + nr : o + 2 * nr]
    alpha = scratch[o + 2 * nr : o + 3 * nr]
    part = scratch[o + 3 * nr : o + 3 * nr + _LANES]
    acc[:] = zero
    m[:] = neg_inf
    lsum[:] = zero
    for r in range(nr):
        for e in range(E):
            qs[r, e] = args.q[q0 + tok[r], hq[r], e] * args.scale
    j0 = s0
    while j0 < s1:
        nk = min(args.block_k, s1 - j0)
        st = st_buf[: nr * nk].reshape((nr, nk))
        if fused:  # few rows: dot products straight from the pages, 16-bit entries widened
            _scores_fused(args.k_pages, args.page_table, b, hk, kb + j0, nk, qs, st, args.half_kind)
        else:
            kt = _tile(args.k_pages, args.page_table, b, hk, kb + j0, nk, kbuf, args.half_kind)
            tile_gemm(args.gemm_kind, args.gemm_fn, qs, kt.T, st)
        masked = args.has_mask_mod or j0 < full_lo or j0 + nk > full_hi  # some rows miss some keys
        for r in range(nr):
            row = st[r]
            # the mods' loops, by address (engine.kernels.mod_calls):
            # loop 0 runs the score_mod, 1 the mask_mod
            b_, h_, q_, k_ = np.int64(b), np.int64(hq[r]), np.int64(pos[r]), np.int64(j0)
            if args.has_score_mod and not mod_loop(0, mod_args, row, b_, h_, q_, k_, mod_args):
                raise RuntimeError(MOD_CALL_MISMATCH)
            if masked:
                a, z = max(0, lo[r] - j0), min(nk - 1, hi[r] - j0)  # visible columns a..z of this tile
                row[: max(0, a)] = neg_inf
                row[max(0, z + 1) :] = neg_inf
                c0, c1 = np.int64(a), np.int64(z + 1)
                if args.has_mask_mod and c0 < c1 and not mod_loop(1, mod_args, row, b_, h_, q_, k_, c0, c1, mod_args):
                    raise RuntimeError(MOD_CALL_MISMATCH)
            # the max ignores NaN scores: exp(NaN) below makes the row's sum, so the row, NaN
            mx = _row_max(row, neg_inf, part)
            # online softmax: a row with nothing visible yet shifts by 0 (its -inf stays -inf -> 0)
            mo = m[r]
            mn = mx if mx > mo else mo
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
            _values_fused(args.v_pages, args.page_table, b, hk, kb + j0, nk, st, pv, args.half_kind)
        else:
            vt = _tile(args.v_pages, args.page_table, b, hk, kb + j0, nk, vbuf, args.half_kind)
            tile_gemm(args.gemm_kind, args.gemm_fn, st, vt, pv)
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
        n = (q0 + tok[r]) * Hq + hq[r]  # row of the packed (total, Hq) output
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
def _varlen_forward(args, mod_args):
    """Every packed row of ``q`` against its sequence's keys, with ``args`` a :class:`VarlenArgs`
    (see the module docstring) and ``mod_args`` the mods' arguments.

    ``q`` (total, Hq, E) of the compute dtype (float32 or float64); ``k_pages``/``v_pages``
    (num_pages, Hkv, page_size, E/Ev) of the compute dtype or ``uint16`` bits of float16/bfloat16
    (``half_kind``); ``page_table`` (B, max_pages) int32, ``k_base``/``seqlens_k`` (B,) int64,
    ``q_start`` (B + 1,) int64; ``gather``: whether a tile may need copying (16-bit entries, or a
    tile that can cross pages). ``part_out`` (splits, total * Hq, Ev) and ``part_lse`` (splits,
    total * Hq) receive each split's normalised partial result (row ``t * Hq + h`` is token t,
    query head h); with ``splits > 1`` they are merged into ``out``/``lse``; with one split pass
    ``out``/``lse`` reshaped as the parts. ``gemm_kind``/``gemm_fn``: the tile products' provider
    (``engine.kernels.cpu.gemm``).
    """
    task_b, task_r0, order, bin_start = _schedule(args)
    size = _scratch_size(args, args.q.shape[2], args.v_pages.shape[3])
    for t in prange(bin_start.shape[0] - 1):
        scratch = np.empty(size, dtype=args.q.dtype)
        rows = np.empty(5 * args.block_rows, dtype=np.int64)
        for x in range(bin_start[t], bin_start[t + 1]):
            _varlen_task(order[x], task_b, task_r0, scratch, rows, args, mod_args)
    if args.splits > 1:
        for n in prange(args.out.shape[0]):
            _merge_row(args.part_out, args.part_lse, n, args.out, args.lse)


@njit(cache=_CACHE)
def head_major(src, dst):
    """``dst[h, t] = src[t, h]``: a packed (total, H, E) array copied head-major, (H, total, E).
    One thread, element loops in source order: 14x faster here than the earlier version
    parallel over blocks of rows with a row slice per assignment (0.57 ms against 8 ms for
    4104 x 8 x 64 float32), and faster than NumPy's transpose copy (0.9 ms)."""
    T, H, E = src.shape
    for t in range(T):
        for h in range(H):
            for e in range(E):
                dst[h, t, e] = src[t, h, e]


_OPTIONS = dict(fastmath=_FM, error_model="numpy")
_kernels = ModKernels(
    _varlen_forward,
    _varlen_task,
    {"_SCORE_MOD": no_score_mod, "_MASK_MOD": no_mask_mod},
    _OPTIONS,
    # the types the driver calls the task with (engine.kernels.task_pointer)
    task_types=lambda args, mod_args: _task_types(args, mod_args),
    loops=(
        ModLoop(score_keys, ("_SCORE_MOD",), lambda args, mod_args: row_types(args, "q", 4, mod_args)),
        ModLoop(mask_keys, ("_MASK_MOD",), lambda args, mod_args: row_types(args, "q", 6, mod_args)),
    ),
)


def _task_types(args, mod_args):
    task_b, task_r0, order, _ = return_types(_schedule, args)
    scratch, rows = vector(field_dtype(args, "q")), vector(types.int64)
    return (order.dtype, task_b, task_r0, scratch, rows, args, mod_args)


_with_mods = _kernels.built


def varlen_kernel(score_mod, mask_mod, serial=False):
    """The kernel for these mods (``None`` for none): ``_varlen_forward`` over its task, the same for
    every pair, which calls the mods' loops by address (``engine.kernels.mod_kernels``).
    ``serial=True``: compiled without ``parallel``, for calls too small to wake the thread pool
    for."""
    return _kernels(score_mod, mask_mod, serial=serial)
