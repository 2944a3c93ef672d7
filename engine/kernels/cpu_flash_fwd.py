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
import hashlib
import marshal
import types

import numpy as np
from numba import njit, prange
from numba import types as nb_types
from numba.extending import overload

from ..jit_cache import cache_enabled
from .fastexp import fast_exp
from .gemm import GEMM_CBLAS_F16, tile_gemm, tile_gemm_16
from .half import f32_to_bf16_bits, f32_to_f16_bits
from .kinds import MASK_BOOL, MASK_FLOAT, TILE_EMPTY, TILE_FULL, TILE_PARTIAL

_CACHE = cache_enabled()



@njit(cache=_CACHE)
def no_score_mod(score, b, h, q_idx, kv_idx, *mod_args):
    """The identity ``score_mod`` passed when the caller gave none."""
    return score


@njit(cache=_CACHE)
def no_mask_mod(b, h, q_idx, kv_idx, *mod_args):
    """The allow-all ``mask_mod`` passed when the caller gave none."""
    return True

# reassoc/contract only: no nnan/ninf, NaN and -inf carry meaning here (NaN rows, masked keys)
_FM = {"contract", "reassoc", "nsz", "arcp"}


# 16-bit operands (uint16 bit patterns of bfloat16 or float16) take the mixed-precision GEMM path:
# q is copied unscaled (exact), the scale is applied to the float32 scores, and the probabilities
# are rounded to the operand format for the second product (as FlashAttention does). These helpers
# are the only places the two paths differ; each compiles to one branch for the operand type.

def _scaled_q(x, scale):
    """What the q tile holds: ``scale * x`` for float operands, the raw bits for 16-bit ones."""


@overload(_scaled_q, inline="always")
def _scaled_q_impl(x, scale):
    if isinstance(x, nb_types.Integer):
        return lambda x, scale: x
    return lambda x, scale: x * scale


def _score_scale(q, scale):
    """The factor still to apply to the scores after the first product (1 for float operands)."""


@overload(_score_scale, inline="always")
def _score_scale_impl(q, scale):
    if isinstance(q.dtype, nb_types.Integer):
        return lambda q, scale: scale
    return lambda q, scale: 1.0


def _half_buffer(q, n):
    """Scratch for the 16-bit probabilities (empty for float operands)."""


@overload(_half_buffer, inline="always")
def _half_buffer_impl(q, n):
    if isinstance(q.dtype, nb_types.Integer):
        return lambda q, n: np.empty(n, dtype=np.uint16)
    return lambda q, n: np.empty(0, dtype=q.dtype)


def _scores_gemm(kind, fn, kt, qt, st):
    """st = kt @ qt."""


@overload(_scores_gemm, inline="always")
def _scores_gemm_impl(kind, fn, kt, qt, st):
    if isinstance(kt.dtype, nb_types.Integer):
        return lambda kind, fn, kt, qt, st: tile_gemm_16(fn, kt, qt, st)
    return lambda kind, fn, kt, qt, st: tile_gemm(kind, fn, kt, qt, st)


def _values_gemm(kind, fn, st, half, vt, pv):
    """pv = st.T @ vt (st rounded into ``half`` first for 16-bit operands)."""


@overload(_values_gemm, inline="always")
def _values_gemm_impl(kind, fn, st, half, vt, pv):
    if isinstance(vt.dtype, nb_types.Integer):
        def impl(kind, fn, st, half, vt, pv):
            nk, nq = st.shape
            p = half[:nk * nq].reshape((nk, nq))
            if kind == GEMM_CBLAS_F16:
                for c in range(nk):
                    for r in range(nq):
                        p[c, r] = f32_to_f16_bits(st[c, r])
            else:
                for c in range(nk):
                    for r in range(nq):
                        p[c, r] = f32_to_bf16_bits(st[c, r])
            tile_gemm_16(fn, p.T, vt, pv)
        return impl
    return lambda kind, fn, st, half, vt, pv: tile_gemm(kind, fn, st.T, vt, pv)


#: the mods the kernels below call; ``flash_kernel`` re-binds these names for other mods
_SCORE_MOD = no_score_mod
_MASK_MOD = no_mask_mod


@njit(cache=_CACHE, fastmath=_FM, error_model="numpy")
def _flash_task(task, q, k, v, fmask, bmask, mask_batch, mask_kind, causal, scale, group, block_q,
                block_k, sub_tiles, mod_args, has_score_mod, tile_kinds, per_tile, gemm_kind, gemm_fn, out, lse):
    """One parallel task: ``sub_tiles`` query tiles of one (batch, head)."""
    B, Hq, L, E = q.shape
    S = k.shape[2]
    Ev = v.shape[3]
    dt = out.dtype
    rows = block_q * sub_tiles
    nqb = (L + rows - 1) // rows
    consts = np.array([-np.inf, 0.0, _score_scale(q, scale)], dtype=dt)  # typed: no float64 promotion
    neg_inf = consts[0]
    zero = consts[1]
    post_scale = consts[2]
    b = task // (Hq * nqb)
    rest = task - b * (Hq * nqb)
    h = rest // nqb
    t0 = (rest - h * nqb) * rows
    t1 = min(t0 + rows, L)
    nt = t1 - t0
    hk = h // group
    mb = mask_batch[b]
    # per-task scratch, reused by every key tile; row state indexed by row - t0
    qt = np.empty((sub_tiles, E * block_q), dtype=q.dtype)  # (scale * q_sub_tile).T, (E, nq) each
    half = _half_buffer(q, block_k * block_q)  # 16-bit operands: the probabilities, rounded
    st_buf = np.empty(block_k * block_q, dtype=dt)   # transposed scores, then probabilities
    pv_buf = np.empty(block_q * Ev, dtype=dt)
    acc = np.zeros((nt, Ev), dtype=dt)
    m = np.full(nt, neg_inf, dtype=dt)         # running max per query row
    l = np.zeros(nt, dtype=dt)                 # running sum per query row
    tm = np.empty(block_q, dtype=dt)
    shift = np.empty(block_q, dtype=dt)
    alpha = np.empty(block_q, dtype=dt)
    ts = np.empty(block_q, dtype=dt)
    for r in range(nt):
        sub = r // block_q
        rr = r - sub * block_q
        nqs = min(block_q, nt - sub * block_q)  # rows of this sub-tile
        for e in range(E):
            qt[sub, e * nqs + rr] = _scaled_q(q[b, h, t0 + r, e], scale)
    kend = min(S, t1) if causal else S
    for j0 in range(0, kend, block_k):
        j1 = min(j0 + block_k, kend)
        nk = j1 - j0
        kt = k[b, hk, j0:j1]
        vt = v[b, hk, j0:j1]
        for sub in range(sub_tiles):
            i0 = t0 + sub * block_q
            i1 = min(i0 + block_q, t1)
            if i0 >= i1 or (causal and j0 > i1 - 1):  # no rows, or all above the diagonal
                continue
            tile = TILE_FULL
            if per_tile:
                tile = tile_kinds[b if tile_kinds.shape[0] > 1 else 0, h if tile_kinds.shape[1] > 1 else 0,
                                  i0 // block_q, j0 // block_k]
                if tile == TILE_EMPTY:  # the mask_mod hides every element: skip the tile
                    continue
            nq = i1 - i0
            o = i0 - t0
            st = st_buf[:nk * nq].reshape((nk, nq))
            _scores_gemm(gemm_kind, gemm_fn, kt, qt[sub, :E * nq].reshape((E, nq)), st)
            if post_scale != 1.0:
                for c in range(nk):
                    for r in range(nq):
                        st[c, r] *= post_scale
            if has_score_mod:
                for c in range(nk):
                    for r in range(nq):
                        st[c, r] = _SCORE_MOD(st[c, r], b, h, i0 + r, j0 + c, *mod_args)
            if tile == TILE_PARTIAL:
                for c in range(nk):
                    for r in range(nq):
                        if not _MASK_MOD(b, h, i0 + r, j0 + c, *mod_args):
                            st[c, r] = neg_inf
            # masking: one specialised straight loop per kind, writing -inf where hidden
            if mask_kind == MASK_FLOAT:
                for c in range(nk):
                    for r in range(nq):
                        mv = fmask[mb, h, i0 + r, j0 + c]
                        st[c, r] = neg_inf if mv == neg_inf else st[c, r] + mv  # -inf hides even NaN
            elif mask_kind == MASK_BOOL:
                for c in range(nk):
                    for r in range(nq):
                        if not bmask[mb, h, i0 + r, j0 + c]:
                            st[c, r] = neg_inf
            elif causal and j1 - 1 > i0:  # tile crosses the diagonal
                for c in range(nk):
                    first = min(j0 + c - i0, nq)  # rows r < first cannot see key j0 + c
                    for r in range(first):
                        st[c, r] = neg_inf
            # column maxima: NumPy's ufunc loop over whole rows vectorises (5x a per-element
            # select into tm here, which LLVM keeps scalar); a NaN makes its column's max NaN,
            # which leaves the running max as it was and the row NaN through exp, as before
            tmq = tm[:nq]
            tmq[:] = neg_inf
            for c in range(nk):
                np.maximum(tmq, st[c], tmq)
            # new running max; a row with nothing visible yet shifts by 0 so its -inf -> 0
            # (and all-NaN rows stay NaN); alpha rescales what was accumulated before
            rescale = False
            for r in range(nq):
                mo = m[o + r]
                mn = tm[r] if tm[r] > mo else mo
                sh = mn if mn > neg_inf else zero
                a = fast_exp(mo - sh)
                shift[r] = sh
                alpha[r] = a
                m[o + r] = mn
                ts[r] = zero
                rescale |= a != 1.0
            # exp and row sums, two key rows per sweep (two independent exp chains: 15% here)
            c = 0
            while c + 2 <= nk:
                s0 = st[c]
                s1 = st[c + 1]
                for r in range(nq):
                    sh = shift[r]
                    p0 = fast_exp(s0[r] - sh)
                    p1 = fast_exp(s1[r] - sh)
                    s0[r] = p0
                    s1[r] = p1
                    ts[r] += p0 + p1
                c += 2
            if c < nk:
                s0 = st[c]
                for r in range(nq):
                    p0 = fast_exp(s0[r] - shift[r])
                    s0[r] = p0
                    ts[r] += p0
            for r in range(nq):
                l[o + r] = l[o + r] * alpha[r] + ts[r]
            pv = pv_buf[:nq * Ev].reshape((nq, Ev))
            _values_gemm(gemm_kind, gemm_fn, st, half, vt, pv)
            if rescale:
                for r in range(nq):
                    a = alpha[r]
                    for c in range(Ev):
                        acc[o + r, c] = acc[o + r, c] * a + pv[r, c]
            else:
                for r in range(nq):
                    for c in range(Ev):
                        acc[o + r, c] += pv[r, c]
    for r in range(nt):
        total = l[r]
        if total > 0.0 or total != total:
            inv = 1.0 / total
            for c in range(Ev):
                out[b, h, t0 + r, c] = acc[r, c] * inv
            lse[b, h, t0 + r] = m[r] + np.log(total)
        else:
            for c in range(Ev):
                out[b, h, t0 + r, c] = zero
            lse[b, h, t0 + r] = neg_inf


# error_model="numpy": a float division by zero gives inf/NaN instead of raising, so divisions
# (ours and those of inlined mods) carry no zero check and their loops vectorise (10x for tanh)
@njit(parallel=True, cache=_CACHE, fastmath=_FM, error_model="numpy")
def _flash_forward(q, k, v, fmask, bmask, mask_batch, mask_kind, causal, scale, group, block_q,
                   block_k, sub_tiles, mod_args, has_score_mod, tile_kinds, gemm_kind, gemm_fn, out, lse):
    """out[b, h] = softmax(scale * q[b, h] @ k[b, h // group].T + mask) @ v[b, h // group].

    q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev), out (B, Hq, L, Ev), lse (B, Hq, L): C order.
    ``fmask`` (float, added) and ``bmask`` (bool, True = may attend), each (Bm, Hq, L, S), may be
    zero-stride views; ``mask_batch[b]`` selects their first index. ``mask_kind`` says which one
    applies: MASK_NONE, MASK_BOOL or MASK_FLOAT; the other is a dummy. Both are always passed so
    that one compiled signature per dtype serves every kind (compile time). ``causal``: top-left, row i sees keys j <= i; key tiles right of the diagonal are
    skipped and only tiles crossing it are masked. Rows with no visible key get zeros and
    lse = -inf; NaN scores propagate to their rows (out and lse NaN).

    ``score_mod(score, b, h, q_idx, kv_idx, *mod_args)`` rewrites each scaled score (before the
    masks) when ``has_score_mod``. ``tile_kinds`` (Bt, Ht, ceil(L / block_q), ceil(S / block_k))
    int8 is the ``mask_mod``'s tile map at these tile sizes (Bt/Ht 1 when it does not depend on
    b/h): empty tiles are skipped, ``mask_mod(b, h, q_idx, kv_idx, *mod_args)`` is evaluated per
    element in partial ones only. Without a ``mask_mod`` it is a (1, 1, 1, 1) array of TILE_FULL,
    ``has_score_mod`` False and ``mod_args`` ``()``.

    ``gemm_kind``/``gemm_fn``: the provider of both tile products and its C function address for
    this dtype (see ``engine.kernels.gemm.tile_gemm``); ``GEMM_NUMPY`` and 0 is ``np.dot``.
    16-bit operands: q, k, v are uint16 bit patterns, ``gemm_fn`` a mixed-precision GEMM
    (``tile_gemm_16``) and ``gemm_kind`` ``GEMM_CBLAS_BF16`` or ``GEMM_CBLAS_F16`` (which format
    the probabilities are rounded to); ``out``/``lse`` are float32.

    A task owns ``sub_tiles`` query tiles of ``block_q`` rows and walks the key tiles once for all
    of them, so each key/value tile is read from memory once and reused from cache by every
    sub-tile (at L = 4096 one head's K and V no longer fit in L2).
    """
    per_tile = tile_kinds.shape[2] > 1 or tile_kinds.shape[3] > 1 or tile_kinds[0, 0, 0, 0] != TILE_FULL
    rows = block_q * sub_tiles
    for task in prange(q.shape[0] * q.shape[1] * ((q.shape[2] + rows - 1) // rows)):
        _flash_task(task, q, k, v, fmask, bmask, mask_batch, mask_kind, causal, scale, group,
                    block_q, block_k, sub_tiles, mod_args, has_score_mod, tile_kinds, per_tile, gemm_kind,
                    gemm_fn, out, lse)


_with_mods: dict = {}


def flash_kernel(score_mod, mask_mod):
    """The kernel for these mods (``None`` for none): ``_flash_forward`` itself without mods, else
    the same code with ``_SCORE_MOD``/``_MASK_MOD`` bound to the caller's mods, built once per
    process per pair.

    The mods are globals of the compiled code, not arguments: Numba then calls them directly
    (inlined, vectorised), and the kernel without mods loads from Numba's disk cache (a function
    argument would put a function type in the signature, which never matches after unpickling).
    Kernels with the built-in variants' mods (modules under ``variants`` or ``engine``) are
    disk-cached under a name tagged by :func:`_cache_tag`; kernels with other mods are compiled
    once per process.
    """
    if score_mod is None and mask_mod is None:
        return _flash_forward
    key = (score_mod, mask_mod)
    if key not in _with_mods:
        tag = _cache_tag(score_mod, mask_mod)
        cache = {"cache": True} if tag else {}
        env = dict(globals(), _SCORE_MOD=score_mod or no_score_mod, _MASK_MOD=mask_mod or no_mask_mod)
        task = njit(**_task_options, **cache)(
            _named(_flash_task.py_func.__code__, env, "_flash_task_mods", tag))
        env = dict(globals(), _flash_task=task)
        _with_mods[key] = njit(**_kernel_options, **cache)(
            _named(_flash_forward.py_func.__code__, env, "_flash_forward_mods", tag))
    return _with_mods[key]


def _named(code, env, name, tag):
    """A function of ``code`` over ``env``, whose qualified name (part of Numba's cache key) ends
    in ``tag``."""
    fn = types.FunctionType(code, env, name)
    fn.__qualname__ = f"{name}_{tag}" if tag else name
    return fn


#: packages whose mods get disk-cached kernels (importable by every process, edited only with
#: the package): the built-in variants and the engine itself
_CACHED_MOD_PACKAGES = ("variants", "engine")


def _cache_tag(score_mod, mask_mod):
    """A name that tells this pair of mods apart in Numba's disk cache, or None to not cache.

    Numba finds a cached kernel by file, qualified name, code and signature; kernels with mods
    share the first and third with the plain one, so the qualified name carries this tag: a hash
    of each mod's module, name and code object (its constants and line numbers too), so an edited
    mod gets a new entry. Not cached: closures (their captured values are compiled in but are not
    in the code) and mods from elsewhere (a script's module cannot be imported by the next process;
    a third-party mod may call functions whose edits the tag cannot see).
    """
    if not _CACHE:
        return None
    h = hashlib.sha256()
    for mod in (score_mod, mask_mod):
        if mod is None:
            h.update(b"-")
            continue
        fn = getattr(mod, "py_func", mod)
        module = getattr(fn, "__module__", None) or ""
        if module.split(".")[0] not in _CACHED_MOD_PACKAGES or not hasattr(fn, "__code__"):
            return None
        if fn.__closure__:  # captured values are compiled in, and the code does not show them
            return None
        h.update(f"{module}.{fn.__qualname__}".encode())
        h.update(marshal.dumps(fn.__code__))  # the mod's code and constants: an edit is a new entry
    return h.hexdigest()[:16]


_task_options = dict(fastmath=_FM, error_model="numpy")
_kernel_options = dict(parallel=True, fastmath=_FM, error_model="numpy")
