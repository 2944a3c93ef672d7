"""The tiled flash-attention backward kernel of the ``cpu`` backend (FlashAttention-2's backward,
Dao 2023, Algorithm 2, on CPU threads).

Nothing of size L x S is stored. For every (key tile, query tile) pair the kernel recomputes the
scores with the forward's own products and arithmetic (``engine.kernels.cpu.flash_fwd``: the same
GEMM on the same operands, the scale applied where the forward applies it, the same exponential),
the weights from the forward's log-sum-exp, ``P = exp(S - lse)``, and then

    dV_j += P^T dO_i          dP = dO_i V_j^T          dS = P * (dP - D_i)
    dK_j += dS^T (scale Q_i)  dQ_i += dS K_j           with D = rowsum(dO * O)

(five tile products; the three that accumulate call BLAS with beta = 1, ``engine.kernels.cpu.blas``;
D and dS's difference in float64). Weights recomputed from other roundings of the scores than the
forward's disagree with its lse and output: float32 gradients then lost half their accuracy.
Tiles are transposed as in the forward (keys along the rows: per-query
quantities lse and D are contiguous vectors and the element-wise passes vectorise).

Parallel tasks own disjoint outputs, so no two threads ever add into the same number and the
result does not depend on scheduling: a task is (batch, key/value head, split), and owns the dK
and dV rows of its split's key tiles (summed over the query heads of a GQA group in a fixed order)
and one private dQ accumulator per query head. The splits cut each head's key tiles into
contiguous runs of equal work (causal tiles counted as they are skipped), so that batch x heads
smaller than the thread count still fills every core; the epilogue sums the splits' dQ
accumulators in split order. The split count depends on the thread count only (see
``engine.backends.cpu``), so gradients are bit for bit the same on every run with the same
thread count. Memory beyond inputs and outputs: ``splits`` dQ-sized accumulators (one when
batch x heads is a multiple of the thread count), one scaled copy of Q and O(tile) per task.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types

from ...runtime.jit_cache import cache_enabled
from ..fastexp import softmax_exp
from ..identity_mods import no_mask_mod, no_score_grad, no_score_mod
from ..kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE, TILE_EMPTY, TILE_FULL, TILE_PARTIAL
from ..mod_arg_grad import READS_CAPACITY, no_arg_grad
from ..mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop
from ..mod_kernels import ModKernels
from ..philox import keep_scale
from ..task_pointer import field_dtype
from .blas import gemm_acc
from .gemm import jit_gemm, tile_gemm
from .mod_loops import arg_grad_tile, mask_tile, score_grad_tile
from .tile_ops import _FM

__all__ = ["backward_kernel", "no_score_grad"]

_CACHE = cache_enabled()


class BackwardArgs(NamedTuple):
    """Everything the backward kernel reads but the mods' arguments, built in one place (the
    ``cpu`` backend's backward op); see :func:`_flash_backward` for what each field holds."""

    q: np.ndarray
    qs: np.ndarray
    scale: float
    fq: int
    jit_scores: int
    jit_scores_h: int
    k: np.ndarray
    v: np.ndarray
    do: np.ndarray
    lrow: np.ndarray
    delta: np.ndarray
    fmask: np.ndarray
    bmask: np.ndarray
    mask_batch: np.ndarray
    mask_kind: int
    causal: bool
    causal_offset: int
    group: int
    block_q: int
    block_k: int
    splits: int
    bounds: np.ndarray
    has_score_mod: bool
    tile_kinds: np.ndarray
    drop_threshold: np.uint64
    drop_keep: float
    seed_lo: np.uint64
    seed_hi: np.uint64
    gemm_kind: int
    gemm_fn: int
    dm_rows: bool
    dm_cols: bool
    want_dm: bool
    dq_part: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dm: np.ndarray
    slots: int
    want_arg_grad: bool
    arg_offsets: np.ndarray
    arg_acc: np.ndarray
    arg_reads: np.ndarray


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _bwd_task(task, slot, args, mod_args, per_tile):
    """One task: the key tiles ``bounds[s] ... bounds[s + 1] - 1`` of one (batch, kv head), run
    by accumulator slot ``slot`` (the mod_args gradients' private sums)."""
    B, Hq, L, E = args.qs.shape
    H = args.k.shape[1]
    S = args.k.shape[2]
    Ev = args.v.shape[3]
    dt = args.dk.dtype
    drop_threshold, drop_scale, seed_lo, seed_hi = args.drop_threshold, args.drop_keep, args.seed_lo, args.seed_hi
    consts = np.array([-np.inf, 0.0, drop_scale, args.scale, 1.0], dtype=dt)  # typed: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    keep = consts[2]
    post_scale = consts[3]
    # the forward's arithmetic (flash_fwd): the scores are q @ k.T and the scale goes into the
    # exponential's argument (an FMA), unless a mod or a float mask reads the scaled scores or the
    # scale is not positive
    prescale = post_scale != consts[4] and (args.has_score_mod or args.mask_kind == MASK_FLOAT or not post_scale > zero)
    pass_scale = consts[4] if prescale else post_scale
    dropping = drop_threshold > 0 or keep != 1.0
    b = task // (H * args.splits)
    rest = task - b * (H * args.splits)
    hk = rest // args.splits
    s = rest - hk * args.splits
    mb = args.mask_batch[b]
    tile_b = b if args.tile_kinds.shape[0] > 1 else 0
    # per-task scratch, reused by every tile pair
    bk = min(args.block_k, S)  # the forward's key tiles may be longer than the keys
    pt_buf = np.empty(bk * args.block_q, dtype=dt)  # transposed scores, then weights P^T
    dpt_buf = np.empty(bk * args.block_q, dtype=dt)  # dP^T, then dS^T
    zt_buf = np.empty(bk * args.block_q if dropping else 1, dtype=dt)  # dropout multipliers
    gt_buf = np.empty(bk * args.block_q if args.has_score_mod else 1, dtype=dt)  # score_mod derivative
    pzt_buf = np.empty(bk * args.block_q if dropping else 1, dtype=dt)  # P^T * Z
    dk_acc = np.empty((bk, E), dtype=dt)
    dv_acc = np.empty((bk, Ev), dtype=dt)
    ts = np.empty(bk * args.fq, dtype=dt)  # one forward-shaped block of scores
    rt_buf = np.empty(bk * args.block_q if args.want_arg_grad else 1, dtype=dt)  # scores before the mod
    reads = np.empty(READS_CAPACITY + 1 if args.want_arg_grad else 1, dtype=np.int64)  # the gathers one mod made
    most = np.zeros(1, dtype=np.int64)  # the most gathers one score made
    for kb in range(args.bounds[s], args.bounds[s + 1]):
        j0 = kb * args.block_k
        j1 = min(j0 + args.block_k, S)
        nk = j1 - j0
        kt = args.k[b, hk, j0:j1]
        vt = args.v[b, hk, j0:j1]
        dk_acc[:nk] = zero
        dv_acc[:nk] = zero
        q_first = 0  # causal: earlier query tiles see none of these keys (query i sees j <= i + offset)
        if args.causal:
            q_first = max(0, j0 - args.causal_offset) // args.block_q * args.block_q
        for h in range(hk * args.group, (hk + 1) * args.group):
            tile_h = h if args.tile_kinds.shape[1] > 1 else 0
            for i0 in range(q_first, L, args.block_q):
                i1 = min(i0 + args.block_q, L)
                nq = i1 - i0
                tile = TILE_FULL
                if per_tile:
                    tile = args.tile_kinds[tile_b, tile_h, i0 // args.block_q, kb]
                    if tile == TILE_EMPTY:  # the mask_mod hides every element: nothing flows
                        continue
                qi = args.qs[b, h, i0:i1]
                doi = args.do[b, h, i0:i1]
                lr = args.lrow[b, h, i0:i1]
                dr = args.delta[b, h, i0:i1]
                pt = pt_buf[: nk * nq].reshape((nk, nq))
                dpt = dpt_buf[: nk * nq].reshape((nk, nq))
                # the scores as the forward computed them: one product per forward query tile of
                # args.fq rows, with its operands (q as given, read transposed) and its GEMM (the
                # generated kernel on full tiles): BLAS rounds differently for other shapes, and
                # weights recomputed from other roundings of the scores disagree with lse and out.
                # No mod and no mask on this tile: the weights straight from the products, with the
                # forward's exponential of the same argument
                plain = (
                    not args.has_score_mod
                    and tile != TILE_PARTIAL
                    and args.mask_kind == MASK_NONE
                    and not (args.causal and j1 - 1 > i0 + args.causal_offset)
                )
                for c0 in range(0, nq, args.fq):
                    w = min(args.fq, nq - c0)
                    tsw = ts[: nk * w].reshape((nk, w))
                    qw = args.q[b, h, i0 + c0 : i0 + c0 + w].T
                    if args.jit_scores != 0 and nk == args.block_k and w == args.fq:
                        jit_gemm(args.jit_scores, args.jit_scores_h, kt, qw, tsw)
                    else:
                        tile_gemm(args.gemm_kind, args.gemm_fn, kt, qw, tsw)
                    lrw = lr[c0 : c0 + w]
                    for c in range(nk):  # 1-D row views: indexing with an offset does not vectorise
                        prow = pt[c, c0 : c0 + w]
                        trow = tsw[c]
                        if plain:
                            for r in range(w):
                                prow[r] = softmax_exp(trow[r] * pass_scale - lrw[r])
                        elif prescale:
                            for r in range(w):
                                prow[r] = trow[r] * post_scale
                        else:
                            for r in range(w):
                                prow[r] = trow[r]
                rt = rt_buf[: nk * nq].reshape((nk, nq)) if args.want_arg_grad else rt_buf.reshape((1, 1))
                # the mods' loops, by address (engine.kernels.mod_calls):
                # loop 0 runs the score_mod (and its derivative), 1 the mask_mod, 2 the mod_args gradients
                gt = gt_buf[: nk * nq].reshape((nk, nq)) if args.has_score_mod else gt_buf.reshape((1, 1))
                if args.has_score_mod and not mod_loop(
                    0, mod_args, pt, gt, rt, args.want_arg_grad, b, h, i0, j0, mod_args
                ):
                    raise RuntimeError(MOD_CALL_MISMATCH)
                if tile == TILE_PARTIAL and not mod_loop(1, mod_args, pt, b, h, i0, j0, mod_args):
                    raise RuntimeError(MOD_CALL_MISMATCH)
                # weights, one specialised straight loop per mask kind; args.lrow is lse with -inf (a
                # row with no visible key) replaced by +inf, so its weights come out 0
                if args.mask_kind == MASK_FLOAT:
                    for c in range(nk):
                        for r in range(nq):
                            mv = args.fmask[mb, h, i0 + r, j0 + c]
                            x = neg_inf if mv == neg_inf else pt[c, r] + mv  # -inf hides even NaN
                            pt[c, r] = softmax_exp(x * pass_scale - lr[r])
                elif args.mask_kind == MASK_BOOL:
                    for c in range(nk):
                        for r in range(nq):
                            x = pt[c, r] if args.bmask[mb, h, i0 + r, j0 + c] else neg_inf
                            pt[c, r] = softmax_exp(x * pass_scale - lr[r])
                elif args.causal and j1 - 1 > i0 + args.causal_offset:  # tile crosses the diagonal
                    for c in range(nk):
                        first = j0 + c - i0 - args.causal_offset  # rows r < first cannot see key j0 + c
                        for r in range(nq):
                            x = pt[c, r] if r >= first else neg_inf
                            pt[c, r] = softmax_exp(x * pass_scale - lr[r])
                elif not plain:  # a score_mod or a partial block without another mask
                    for c in range(nk):
                        for r in range(nq):
                            pt[c, r] = softmax_exp(pt[c, r] * pass_scale - lr[r])
                pz = pt
                if dropping:
                    zt = zt_buf[: nk * nq].reshape((nk, nq))
                    keep_scale(seed_lo, seed_hi, b, h, i0, nq, j0, nk, drop_threshold, keep, zt)
                    pz = pzt_buf[: nk * nq].reshape((nk, nq))
                    for c in range(nk):
                        for r in range(nq):
                            pz[c, r] = pt[c, r] * zt[c, r]
                gemm_acc(pz, doi, dv_acc[:nk], False)  # dV_j += (P Z)^T dO_i (the tile is transposed)
                np.dot(vt, doi.T, dpt)  # dP^T
                # dS = P (dP - D) in float64, rounded once: dP - D cancels where a row's weight is
                # concentrated, and D is kept in float64 (a float32 D and difference each added an
                # error there that the rest of dS's products then multiplied)
                if dropping:
                    for c in range(nk):
                        for r in range(nq):
                            dpt[c, r] = np.float64(pt[c, r]) * (np.float64(dpt[c, r]) * np.float64(zt[c, r]) - dr[r])
                else:
                    for c in range(nk):
                        for r in range(nq):
                            dpt[c, r] = np.float64(pt[c, r]) * (np.float64(dpt[c, r]) - dr[r])
                if args.want_dm:  # the float mask's gradient is dS (after the score_mod)
                    for c in range(nk):
                        col = j0 + c if args.dm_cols else kb
                        for r in range(nq):
                            args.dm[b, h, i0 + r if args.dm_rows else 0, col] += dpt[c, r]
                if args.want_arg_grad:  # d loss / d mod_args: dS times the mod's partials, per slot
                    acc, offsets = args.arg_acc[slot], args.arg_offsets
                    if not mod_loop(2, mod_args, dpt, rt, b, h, i0, j0, mod_args, acc, reads, offsets, most):
                        raise RuntimeError(MOD_CALL_MISMATCH)
                if args.has_score_mod:  # chain rule through the score_mod; 0 where the weight is 0
                    for c in range(nk):
                        for r in range(nq):
                            dpt[c, r] = dpt[c, r] * gt[c, r] if pt[c, r] != zero else zero
                gemm_acc(dpt, qi, dk_acc[:nk], False)  # dK_j += dS^T (scale Q_i)
                gemm_acc(dpt, kt, args.dq_part[s, b, h, i0:i1], True)  # dQ_i += dS K_j (scaled at the end)
        for c in range(nk):
            for e in range(E):
                args.dk[b, hk, j0 + c, e] = dk_acc[c, e]
            for e in range(Ev):
                args.dv[b, hk, j0 + c, e] = dv_acc[c, e]
    if args.want_arg_grad:
        args.arg_reads[task] = most[0]


@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _flash_backward(args, mod_args):
    """Gradients of ``out = softmax(scale * q @ k.T + mask) @ v`` per (batch, head), tiled, with
    ``args`` a :class:`BackwardArgs` (the fields below) and ``mod_args`` the task's (the mods'
    loops' addresses and tags, then the caller's: ``engine.kernels.mod_calls.task_mod_args``).

    ``q`` (B, Hq, L, E) is the forward's query: the scores are recomputed as the forward computed
    them (``q @ k.T`` by ``gemm_kind``/``gemm_fn``, or by the generated kernel ``jit_scores`` with
    handle ``jit_scores_h`` on tiles of ``fq`` x ``block_k``, the forward's tiles; ``scale``
    applied as the forward applies it). From :func:`_backward_prologue`: ``qs`` = scale * q
    (dK's operand), ``delta`` = rowsum(dO * O) (float64) and ``lrow`` = the forward's lse with
    -inf replaced by +inf (B, Hq, L). k (B, H, S, E),
    v (B, H, S, Ev), do (B, Hq, L, Ev), all C order. Writes dk (B, H, S, E), dv (B, H, S, Ev)
    (summed over each GQA group) and the splits' unscaled dQ accumulators ``dq_part``
    (splits, B, Hq, L, E), zeroed by the caller and summed by :func:`_backward_epilogue`.

    Masks, ``causal``, mods (``has_score_mod``, ``tile_kinds`` at these tile sizes) and
    the dropout fields are the forward kernel's (``engine.kernels.cpu.flash_fwd.FlashArgs``), as are
    ``gemm_kind``/``gemm_fn``: the scores are recomputed by the forward's tile-product provider. ``splits``
    and ``bounds`` (int64, splits + 1 entries from 0 to ceil(S / block_k)) cut each head's key
    tiles into the tasks' runs. With ``want_dm``, ``dm`` (float64, B, Hq, L or 1, S or number of
    key tiles, zeroed) receives the float mask's gradient dS: per row when ``dm_rows`` (else
    summed over rows), per key when ``dm_cols`` (else summed per key tile). ``causal_offset``:
    query i sees keys j <= i + offset (bottom-right causal: S - L).

    Tasks run in ``slots`` parallel slots, slot ``s`` running tasks ``s, s + slots, ...`` in that
    order (``slots`` = the task count unless ``mod_args`` take a gradient). With
    ``want_arg_grad``, each score with dS != 0 goes through the mod_args gradients' loop
    (``engine.kernels.mod_arg_grad``), adding dS times the score_mod's partials with respect to
    the marked ``mod_args`` elements it reads into ``arg_acc[slot]`` (float64, the marked arrays
    end to end from ``arg_offsets``); ``arg_reads[task]`` gets the most elements one score read.
    """
    B = args.qs.shape[0]
    H = args.k.shape[1]
    per_tile = args.tile_kinds.shape[2] > 1 or args.tile_kinds.shape[3] > 1 or args.tile_kinds[0, 0, 0, 0] != TILE_FULL
    tasks = B * H * args.splits
    for slot in prange(args.slots):
        # the index is int64 when typed, uint64 when lowered: one type, one compilation of the task
        for task in range(np.int64(slot), tasks, args.slots):
            _bwd_task(np.int64(task), np.int64(slot), args, mod_args, per_tile)


# prologue and epilogue: O(L) work, single-threaded (a parallel loop would cost more compile time
# than it saves: they are under 1% of a call)
@njit(cache=_CACHE, error_model="numpy")
def _backward_prologue(q, o, do, lse, dlse, has_dlse, scale, qs, delta, lrow):
    """``qs = scale * q`` (dK then carries the scale); ``delta = rowsum(dO * O) - dlse`` in float64
    (``dlse``, float64 (B, Hq, L), read when ``has_dlse``: the gradient through lse, whose
    derivative with respect to a score is its weight, so that it joins dS = P (dP - delta)); ``lrow`` = lse with -inf (a
    row with no visible key) replaced by +inf, so that exp(score - lrow) is 0 on such rows.
    Ev >= 1."""
    B, Hq, L, E = q.shape
    Ev = o.shape[3]
    for b in range(B):
        for h in range(Hq):
            for i in range(L):
                for e in range(E):
                    qs[b, h, i, e] = q[b, h, i, e] * scale
                # in float64 (kept so: an error in D reaches every dS of the row)
                acc = np.float64(do[b, h, i, 0]) * np.float64(o[b, h, i, 0])
                for e in range(1, Ev):
                    acc += np.float64(do[b, h, i, e]) * np.float64(o[b, h, i, e])
                if has_dlse:
                    acc -= dlse[b, h, i]
                delta[b, h, i] = acc
                x = lse[b, h, i]
                lrow[b, h, i] = -x if x == -np.inf else x


@njit(cache=_CACHE, error_model="numpy")
def _backward_epilogue(dq_part, scale, dq):
    """dQ = scale * (the splits' accumulators summed in split order), in float64 and rounded once."""
    S, B, Hq, L, E = dq_part.shape
    for b in range(B):
        for h in range(Hq):
            for i in range(L):
                for e in range(E):
                    acc = np.float64(dq_part[0, b, h, i, e])
                    for s in range(1, S):
                        acc += np.float64(dq_part[s, b, h, i, e])
                    dq[b, h, i, e] = acc * scale


def _tile(args):
    return types.Array(field_dtype(args, "dk"), 2, "C")


def _field(args, name):
    return args.types[args.fields.index(name)]


# what the task passes its mod loops (engine.kernels.cpu.mod_loops), for its argument types
_INDICES = (types.int64,) * 4


def _score_types(args, mod_args):
    return (_tile(args),) * 3 + (_field(args, "want_arg_grad"),) + _INDICES + (mod_args,)


def _mask_types(args, mod_args):
    return (_tile(args),) + _INDICES + (mod_args,)


def _arg_grad_types(args, mod_args):
    acc = types.Array(types.float64, 1, "C")
    ints = types.Array(types.int64, 1, "C")
    return (_tile(args),) * 2 + _INDICES + (mod_args, acc, ints, _field(args, "arg_offsets"), ints)


_kernels = ModKernels(
    _flash_backward,
    _bwd_task,
    {"_SCORE_MOD": no_score_mod, "_SCORE_GRAD": no_score_grad, "_MASK_MOD": no_mask_mod, "_ARG_GRAD": no_arg_grad},
    dict(fastmath=_FM, error_model="numpy"),
    # the types the driver calls the task with (engine.kernels.task_pointer)
    task_types=lambda args, mod_args: (types.int64, types.int64, args, mod_args, types.boolean),
    loops=(
        ModLoop(score_grad_tile, ("_SCORE_MOD", "_SCORE_GRAD"), _score_types),
        ModLoop(mask_tile, ("_MASK_MOD",), _mask_types),
        # the generated step is the same code for every score_mod: the mod is in the loop's tag
        ModLoop(arg_grad_tile, ("_ARG_GRAD", "_SCORE_MOD"), _arg_grad_types),
    ),
)
_with_mods = _kernels.built


def backward_kernel(score_mod, score_grad, mask_mod, arg_grad=None):
    """The backward kernel for these mods (``None`` for none), the score_mod's compiled
    derivative and its mod_args step (``engine.kernels.mod_arg_grad``; None when no mod_args take
    a gradient): ``_flash_backward`` over its task, the same for all of them, which calls the
    mods' loops (built once per process per tuple) by address (``engine.kernels.mod_kernels``)."""
    if score_mod is None and mask_mod is None:  # a derivative alone is the identity's: no mods
        return _kernels(*(None,) * len(_kernels.defaults))
    return _kernels(score_mod, score_grad, mask_mod, arg_grad)
