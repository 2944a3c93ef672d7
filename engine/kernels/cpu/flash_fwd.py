"""The tiled flash-attention forward kernel of the ``cpu`` backend.

One parallel task per (batch, query head, query tile). Each task walks the key tiles, computes the
*transposed* tile of scores ``st = k_tile @ (scale * q_tile).T`` with BLAS (``np.dot`` on
contiguous blocks), and folds it into a running row maximum, running sum and output accumulator
(online softmax), so no L x S matrix ever exists: working memory is O(tile) per task and the
output is the only O(L) allocation.

Why transposed: with keys along the rows of ``st`` and queries along its columns, every per-query
quantity (running max, shift, sum) is a contiguous vector, and the max, exp and sum passes are
element-wise loops over query columns, which LLVM vectorises; per-row horizontal reductions do not
vectorise in Numba. The second product takes ``st.T`` (an F-ordered view), which BLAS reads as a
transposed operand at no cost.

BLAS must not start its own threads inside our parallel tasks (oversubscription cost 3x at
L = 4096): the wrapper holds OpenBLAS at one thread during the call, or, where it cannot, sizes
the tiles below OpenBLAS's multithreading threshold.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types

from ...runtime.jit_cache import cache_enabled
from ..fastexp import fast_exp
from ..identity_mods import no_mask_mod, no_score_mod
from ..kinds import MASK_BOOL, MASK_FLOAT, TILE_EMPTY, TILE_FULL, TILE_PARTIAL
from ..mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop
from ..mod_kernels import ModKernels
from ..philox import keep_scale
from ..task_pointer import field_dtype
from .amx_steps import _amx_finish, _amx_operands, _amx_rescale, _amx_scores, _amx_values_acc, _pair_buffer, _pair_rows
from .borrow import borrowed, keep_alive
from .gemm import GEMM_AMX_BF16, GEMM_AMX_F16, GEMM_CBLAS_F16, jit_gemm
from .mod_loops import mask_tile, score_tile
from .softmax_tile import STALE_MAX_MARGIN, column_max
from .tile_ops import (
    _FM,
    _add_nonfinite,
    _aligned_empty,
    _apply_dropout,
    _exp_into,
    _finish_rows,
    _finite_values,
    _half_buffer,
    _line,
    _scores_gemm,
    _values_finite,
    _values_gemm_acc,
)
from .vector_width import wide_vectors

_CACHE = cache_enabled()


class FlashArgs(NamedTuple):
    """Everything the forward kernel reads but the mods' arguments, built in one place (the
    ``cpu`` backend's forward op) and passed as one value through the parallel driver to each task
    (see :func:`_flash_forward` for what each field holds)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    fmask: np.ndarray
    bmask: np.ndarray
    mask_batch: np.ndarray
    mask_kind: int
    causal: bool
    causal_offset: int
    scale: float
    group: int
    block_q: int
    block_k: int
    sub_tiles: int
    has_score_mod: bool
    tile_kinds: np.ndarray
    drop_threshold: np.uint64
    drop_keep: float
    seed_lo: np.uint64
    seed_hi: np.uint64
    gemm_kind: int
    gemm_fn: int
    jit_scores: int
    jit_scores_h: int
    jit_values: int
    jit_values_h: int
    out: np.ndarray
    lse: np.ndarray
    k_amx: np.ndarray
    vt_amx: np.ndarray


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _flash_task(task, args, mod_args, per_tile):
    """One parallel task: ``sub_tiles`` query tiles of one (batch, head)."""
    wide_vectors()
    B, Hq, L, E = args.q.shape
    S = args.k.shape[2]
    Ev = args.out.shape[3]
    dt = args.lse.dtype  # the arithmetic's (out holds 16-bit bits on the 16-bit paths)
    f16 = args.gemm_kind == GEMM_CBLAS_F16 or args.gemm_kind == GEMM_AMX_F16
    # Intel AMX (kernels.cpu.amx): v arrives transposed, (B, H, Ev, S), and the accumulator is kept
    # transposed, (Ev, rows); both products by amx_gemm's address (gemm_fn)
    amx = args.gemm_kind == GEMM_AMX_BF16 or args.gemm_kind == GEMM_AMX_F16
    rows = args.block_q * args.sub_tiles
    nqb = (L + rows - 1) // rows
    drop_threshold, drop_scale, seed_lo, seed_hi = args.drop_threshold, args.drop_keep, args.seed_lo, args.seed_hi
    # typed constants: no float64 promotion
    neg_inf = dt.type(-np.inf)
    zero = dt.type(0.0)
    keep = dt.type(drop_scale)
    post_scale = dt.type(args.scale)
    margin = dt.type(STALE_MAX_MARGIN)
    one = dt.type(1.0)
    dropping = drop_threshold > 0 or keep != 1.0
    # the scores are q @ k.T from q as it is (no scaled copy): the scale is applied in the softmax
    # pass (an FMA), unless a mod or a float mask needs the scaled scores before it, or the scale
    # is not positive (a masked -inf times 0 is NaN, and a negative one turns maxima into minima)
    prescale = post_scale != one and (args.has_score_mod or args.mask_kind == MASK_FLOAT or not post_scale > zero)
    pass_scale = one if prescale else post_scale
    b = task // (Hq * nqb)
    rest = task - b * (Hq * nqb)
    h = rest // nqb
    t0 = (rest - h * nqb) * rows
    t1 = min(t0 + rows, L)
    nt = t1 - t0
    hk = h // args.group
    mb = args.mask_batch[b]
    # per-task scratch, reused by every key tile, cut from one allocation per dtype (a dozen
    # allocations cost as much as the products of a 32 x 32 tile); row state indexed by row - t0
    bq, bk = args.block_q, args.block_k
    half = _half_buffer(args.q, bk * bq)  # 16-bit operands: the probabilities, rounded
    drop_size = bk * bq if dropping else 1
    # views cut from borrowed arrays count no references (kernels.cpu.borrow): the scratch is
    # kept alive to the end of the task, the arguments are alive for the whole call
    # the AMX path's transposed accumulator has a multiple of 32 columns: a partial tile's
    # values product writes 32 (amx_steps._amx_values_acc)
    ntp = (nt + 31) // 32 * 32 if amx else nt
    fraw = _aligned_empty(2 * _line(bk * bq) + _line(ntp * Ev) + 2 * _line(nt) + 5 * _line(bq) + _line(drop_size), dt)
    draw = np.empty(_line(nt) + bq, dtype=np.float64)
    fbuf, dbuf = borrowed(fraw), borrowed(draw)
    q_all, k_all, v_all = borrowed(args.q), borrowed(args.k), borrowed(args.v)
    o = 0
    st_buf = fbuf[o : o + bk * bq]  # transposed scores
    o += _line(bk * bq)
    pt_buf = fbuf[o : o + bk * bq]  # their probabilities
    o += _line(bk * bq)
    acc_raw = fbuf[o : o + ntp * Ev]
    acc = acc_raw[: nt * Ev].reshape((nt, Ev))
    acct = acc_raw.reshape((Ev, ntp))  # the same memory, transposed (AMX)
    o += _line(ntp * Ev)
    m = fbuf[o : o + nt]  # the shift of each query row's exponentials
    o += _line(nt)
    mr = fbuf[o : o + nt]  # the same unscaled: the score it was taken from (the 16-bit passes')
    o += _line(nt)
    tm = fbuf[o : o + bq]
    o += _line(bq)
    tmx = fbuf[o : o + bq]
    o += _line(bq)
    shift_raw = fbuf[o : o + bq]
    o += _line(bq)
    alpha = fbuf[o : o + bq]
    o += _line(bq)
    tc = fbuf[o : o + bq]
    o += _line(bq)
    zt_buf = fbuf[o : o + drop_size]  # dropout multipliers
    l = dbuf[:nt]  # noqa: E741  (running sum per query row, float64: see softmax_tile.SUM_CHUNK)
    ts = dbuf[_line(nt) : _line(nt) + bq]
    acc_raw[:] = zero
    # the task's queries paired (AMX), and 32 spare entries a partial tile's product reads
    qraw = _pair_buffer(args.q, E // 2 * nt + 32 if amx else 0)
    qv = borrowed(qraw)
    if amx:
        _pair_rows(q_all, b, h, t0, nt, qv)
        qv[E // 2 * nt :] = 0
    # the task's query tiles transposed once, each (E, rows of the tile) row-major: the scores
    # product's right operand for every key tile (a BLAS packs a transposed view on each call).
    # Not for AMX (its own pairs, above); MKL's generated GEMMs of full tiles take the view they
    # were made for, its ?gemm at the edges this copy
    q_rows = not amx
    qtraw = np.empty(E * nt if q_rows else 0, dtype=args.q.dtype)
    qtv = borrowed(qtraw)
    if q_rows:
        for r in range(nt):
            s0 = (r // bq) * E * bq
            w = min(bq, nt - (r // bq) * bq)
            c0 = r % bq
            for d in range(E):
                qtv[s0 + d * w + c0] = q_all[b, h, t0 + r, d]
    m[:] = neg_inf
    l[:] = 0.0
    kend = max(0, min(S, t1 + args.causal_offset)) if args.causal else S
    for j0 in range(0, kend, args.block_k):
        j1 = min(j0 + args.block_k, kend)
        nk = j1 - j0
        kt = k_all[b, hk, j0:j1]
        vt = v_all[b, hk, j0:j1]
        v_finite = _values_finite(vt)
        for sub in range(args.sub_tiles):
            i0 = t0 + sub * args.block_q
            i1 = min(i0 + args.block_q, t1)
            if i0 >= i1 or (args.causal and j0 > i1 - 1 + args.causal_offset):  # no rows, or all above the diagonal
                continue
            tile = TILE_FULL
            if per_tile:
                tile = args.tile_kinds[
                    b if args.tile_kinds.shape[0] > 1 else 0,
                    h if args.tile_kinds.shape[1] > 1 else 0,
                    i0 // args.block_q,
                    j0 // args.block_k,
                ]
                if tile == TILE_EMPTY:  # the mask_mod hides every element: skip the tile
                    continue
            nq = i1 - i0
            o = i0 - t0
            # a full tile has the shape the generated GEMM kernels were made for
            full = args.jit_scores != 0 and nk == args.block_k and nq == args.block_q
            st = st_buf[: nk * nq].reshape((nk, nq))
            qs = q_all[b, h, i0:i1].T  # (E, nq), read transposed by the GEMM
            if amx:  # (the AMX steps compile to nothing for float operands: tile_ops)
                _amx_scores(args.gemm_fn, args.k, args.k_amx, b, hk, j0, qv, o, nt, st, pt_buf)
            elif full:
                jit_gemm(args.jit_scores, args.jit_scores_h, kt, qs, st)
            else:
                qc = qtv[o * E : o * E + E * nq].reshape((E, nq))  # (o = sub * bq: tile sub's copy)
                _scores_gemm(args.gemm_kind, args.gemm_fn, kt, qc, st)
            if prescale:
                for c in range(nk):
                    for r in range(nq):
                        st[c, r] *= post_scale
            # the mods' loops, by address (engine.kernels.mod_calls):
            # loop 0 runs the score_mod, 1 the mask_mod
            if args.has_score_mod and not mod_loop(0, mod_args, st, b, h, i0, j0, mod_args):
                raise RuntimeError(MOD_CALL_MISMATCH)
            if tile == TILE_PARTIAL and not mod_loop(1, mod_args, st, b, h, i0, j0, mod_args):
                raise RuntimeError(MOD_CALL_MISMATCH)
            # masking: one specialised straight loop per kind, writing -inf where hidden
            if args.mask_kind == MASK_FLOAT:
                for c in range(nk):
                    for r in range(nq):
                        mv = args.fmask[mb, h, i0 + r, j0 + c]
                        st[c, r] = neg_inf if mv == neg_inf else st[c, r] + mv  # -inf hides even NaN
            elif args.mask_kind == MASK_BOOL:
                for c in range(nk):
                    for r in range(nq):
                        if not args.bmask[mb, h, i0 + r, j0 + c]:
                            st[c, r] = neg_inf
            elif args.causal and j1 - 1 > i0 + args.causal_offset:  # tile crosses the diagonal
                for c in range(nk):
                    first = min(j0 + c - i0 - args.causal_offset, nq)  # rows r < first cannot see key j0 + c
                    for r in range(first):
                        st[c, r] = neg_inf
            # the softmax (softmax_tile): rows that have seen a visible score keep their shift
            # while this tile stays within the margin above it (one pass, no rescale); a row
            # with nothing visible yet takes the tile's maximum first. A NaN leaves the shift as
            # it was and makes the row NaN through its sum; a row with nothing visible shifts
            # by 0 so its -inf -> 0; alpha rescales what was accumulated before. Each row's
            # arithmetic depends on its own scores only, so a NaN row leaves the others' bits
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
                    # nothing was added to such a row but zeros (or NaNs, which stay): no rescale
                    alpha[r] = one
                    m[o + r] = mn
                    mr[o + r] = tm[r] if mn > neg_inf else zero
                else:
                    alpha[r] = one
                shift_raw[r] = mr[o + r]
            pt = pt_buf[: nk * nq].reshape((nk, nq))
            _exp_into(args.gemm_kind, dropping, st, pt, half, pass_scale, shift_raw, ts, tc, tmx)
            # (the margin and the rescale in the exponents' terms, from unscaled maxima: exp_tile)
            redo = False
            for r in range(nq):
                redo |= (tmx[r] - mr[o + r]) * pass_scale > margin
            if redo:  # the shift moves up to the tile's maximum where it passed the margin
                for r in range(nq):
                    if (tmx[r] - mr[o + r]) * pass_scale > margin:
                        alpha[r] *= fast_exp((mr[o + r] - tmx[r]) * pass_scale)
                        m[o + r] = tmx[r] * pass_scale
                        mr[o + r] = tmx[r]
                        shift_raw[r] = tmx[r]
                _exp_into(args.gemm_kind, dropping, st, pt, half, pass_scale, shift_raw, ts, tc, tmx)
            rescale = False
            for r in range(nq):
                l[o + r] = l[o + r] * alpha[r] + ts[r]
                rescale |= alpha[r] != one
            if dropping:  # the sum above (so args.lse) is of the kept and dropped weights, as torch
                zt = zt_buf[: nk * nq].reshape((nk, nq))
                keep_scale(seed_lo, seed_hi, b, h, i0, nq, j0, nk, drop_threshold, keep, zt)
                _apply_dropout(args.gemm_kind, pt, zt, half)
            accs = acc[o : o + nq]
            if rescale and amx:
                _amx_rescale(acct, alpha, o, nq, args.k)
            elif rescale:
                for r in range(nq):
                    a = alpha[r]
                    if a == zero:  # the old terms' weights underflowed: drop them (an inf stays out)
                        for c in range(Ev):
                            accs[r, c] = zero
                    else:
                        for c in range(Ev):
                            accs[r, c] *= a
            if amx:
                _amx_values_acc(args.gemm_fn, args.vt_amx, b, hk, j0, nk, half, nq, acct, o, args.k)
            elif not v_finite:  # the finite part's product as a finite tile's, then the NaN/inf values
                vz_buf = np.empty(nk * Ev, dtype=args.v.dtype)  # alone, in the rows that weigh them
                vz = _finite_values(vt, vz_buf)  # (kernels.nonfinite); rare: allocated where needed
                if full:
                    jit_gemm(args.jit_values, args.jit_values_h, pt, vz, accs)
                else:
                    _values_gemm_acc(args.gemm_kind, args.gemm_fn, pt, half, vz, accs)
                _add_nonfinite(pt, vt, accs)
            elif full:
                jit_gemm(args.jit_values, args.jit_values_h, pt, vt, accs)
            else:
                _values_gemm_acc(args.gemm_kind, args.gemm_fn, pt, half, vt, accs)
    ob = borrowed(args.out)[b, h, t0:t1]  # the task's output rows (no reference count)
    lse = borrowed(args.lse)[b, h, t0:t1]
    if amx:  # the transposed accumulator
        _amx_finish(args.gemm_fn, acct, l, m, ob, lse, f16)
    else:
        _finish_rows(acc, l, m, tm, ob, lse, f16)
    keep_alive(fraw)
    keep_alive(draw)
    keep_alive(qraw)
    keep_alive(qtraw)


# error_model="numpy": a float division by zero gives inf/NaN instead of raising, so divisions
# (ours and those of inlined mods) carry no zero check and their loops vectorise (10x for tanh)
@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _flash_forward(args, mod_args):
    """out[b, h] = softmax(scale * q[b, h] @ k[b, h // group].T + mask) @ v[b, h // group], with
    ``args`` a :class:`FlashArgs` (the fields below) and ``mod_args`` the task's (a separate
    argument: a parallel loop cannot take a tuple inside a tuple): the mods' loops' addresses and
    tags, then the caller's ``mod_args`` packed behind an address or as they are
    (``engine.kernels.mod_calls.task_mod_args``).

    q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev), out (B, Hq, L, Ev), lse (B, Hq, L): C order.
    ``fmask`` (float, added) and ``bmask`` (bool, True = may attend), each (Bm, Hq, L, S), may be
    zero-stride views; ``mask_batch[b]`` selects their first index. ``mask_kind`` says which one
    applies: MASK_NONE, MASK_BOOL or MASK_FLOAT; the other is a dummy. Both are always passed so
    that one compiled signature per dtype serves every kind (compile time). ``causal``: row i
    sees keys j <= i + ``causal_offset`` (0: top left; S - L: bottom right); key tiles right of
    the diagonal are skipped and only tiles crossing it are masked. Rows with no visible key get zeros and
    lse = -inf; NaN scores propagate to their rows (out and lse NaN).

    ``score_mod(score, b, h, q_idx, kv_idx, *mod_args)`` rewrites each scaled score (before the
    masks) when ``has_score_mod``. ``tile_kinds`` (Bt, Ht, ceil(L / block_q), ceil(S / block_k))
    int8 is the ``mask_mod``'s tile map at these tile sizes (Bt/Ht 1 when it does not depend on
    b/h): empty tiles are skipped, ``mask_mod(b, h, q_idx, kv_idx, *mod_args)`` is evaluated per
    element in partial ones only (both through the mods' loops). Without a ``mask_mod`` it is a
    (1, 1, 1, 1) array of TILE_FULL, and without mods ``has_score_mod`` is False and the loops'
    addresses 0.

    ``drop_threshold``, ``drop_keep`` (1 / (1 - p)), ``seed_lo``, ``seed_hi`` (uint64, float,
    uint64, uint64) are the dropout: with a threshold > 0, each weight is kept and scaled by 1 / (1 - p), or dropped, as
    ``engine.kernels.philox.keep_scale`` decides from (b, h, i, j) alone; ``lse`` stays that of
    the weights before dropout. ``0, 1.0, 0, 0`` without dropout.

    ``gemm_kind``/``gemm_fn``: the provider of both tile products and its C function address for
    this dtype (see ``engine.kernels.cpu.gemm.tile_gemm``); ``GEMM_NUMPY`` and 0 is ``np.dot``.
    16-bit operands: q, k, v are uint16 bit patterns, ``gemm_fn`` a mixed-precision GEMM
    (``tile_gemm_16``) and ``gemm_kind`` ``GEMM_CBLAS_BF16`` or ``GEMM_CBLAS_F16`` (which format
    the probabilities are rounded to), or ``GEMM_AMX_BF16``/``GEMM_AMX_F16`` with ``gemm_fn`` the
    address of ``kernels.cpu.amx.amx_gemm`` and ``v`` transposed, (B, H, Ev, Sp), Sp = S rounded
    up to a multiple of 32 (zero past S), E, Ev and the tiles multiples of 32; ``out`` is uint16,
    the output rounded to the operands' format as it is written, and ``lse`` float32.

    A task owns ``sub_tiles`` query tiles of ``block_q`` rows and walks the key tiles once for all
    of them, so each key/value tile is read from memory once and reused from cache by every
    sub-tile (at L = 4096 one head's K and V no longer fit in L2).
    """
    if args.vt_amx.shape[0] > 0:  # the AMX path's k and v.T, made in this call's thread pool
        for bh in prange(args.v.shape[0] * args.v.shape[1]):
            _amx_operands(args.k, args.v, args.k_amx, args.vt_amx, bh)
    per_tile = args.tile_kinds.shape[2] > 1 or args.tile_kinds.shape[3] > 1 or args.tile_kinds[0, 0, 0, 0] != TILE_FULL
    rows = args.block_q * args.sub_tiles
    for task in prange(args.q.shape[0] * args.q.shape[1] * ((args.q.shape[2] + rows - 1) // rows)):
        # the index is int64 when typed, uint64 when lowered: one type, one compilation of the task
        _flash_task(np.int64(task), args, mod_args, per_tile)


def _tile_types(args, mod_args):
    """What the task passes its mod loops: the transposed score tile, b, h, q0, k0, mod_args."""
    return (types.Array(field_dtype(args, "lse"), 2, "C"),) + (types.int64,) * 4 + (mod_args,)


_OPTIONS = dict(fastmath=_FM, error_model="numpy")
_kernels = ModKernels(
    _flash_forward,
    _flash_task,
    {"_SCORE_MOD": no_score_mod, "_MASK_MOD": no_mask_mod},
    _OPTIONS,
    # the types the driver calls the task with (engine.kernels.task_pointer)
    task_types=lambda args, mod_args: (types.int64, args, mod_args, types.boolean),
    loops=(ModLoop(score_tile, ("_SCORE_MOD",), _tile_types), ModLoop(mask_tile, ("_MASK_MOD",), _tile_types)),
)
#: the kernels built for mods in this process, by (score_mod, mask_mod, serial)
_with_mods = _kernels.built


def flash_kernel(score_mod, mask_mod, serial=False):
    """The kernel for these mods (``None`` for none): ``_flash_forward`` over its task, the same for
    every pair, which calls the mods' loops (``score_tile``/``mask_tile`` of
    ``engine.kernels.cpu.mod_loops``, built once per process per pair) by address
    (``engine.kernels.mod_kernels``). ``serial=True``: the same code without ``parallel``, for
    calls too small to pay for waking the thread pool."""
    return _kernels(score_mod, mask_mod, serial=serial)
