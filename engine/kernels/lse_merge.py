"""The exact log-sum-exp merge of partial attention results over disjoint key sets.

Attention of one query row over keys ``K = K_1 u ... u K_P`` (disjoint) is, with ``o_p`` and
``lse_p`` the normalised output and natural-log log-sum-exp over ``K_p`` alone::

    lse = log(sum_p exp(lse_p)),    o = sum_p exp(lse_p - lse) * o_p

computed after shifting by ``M = max_p lse_p`` so nothing overflows. This is the combine step of
split-KV decoding (FlashAttention's ``num_splits``, Dao et al., "Flash-Decoding for long-context
inference", 2023) and of the online softmax itself (Milakov & Gimelshein, 2018).

``_merge_row`` is the one implementation: the public ``engine.merge_attention`` runs it over every
row through ``_merge_rows``, and the split-KV decode kernel calls it inline on its partials.
"""

import numpy as np
from numba import njit, prange

from ..runtime.jit_cache import cache_enabled
from .fastexp import fast_exp

_CACHE = cache_enabled()


@njit(cache=_CACHE, error_model="numpy")
def _merge_row(part_out, part_lse, n, out, lse):
    """Merge row ``n`` of ``P`` parts: ``part_out`` (P, N, Ev), ``part_lse`` (P, N) into
    ``out[n]`` (Ev,) and ``lse[n]``.

    Parts with ``lse_p = -inf`` hold no key and are skipped (their output is never read). A row
    whose every part is empty gets zeros and ``-inf``. A NaN ``lse_p`` (a NaN score), or ``+inf``
    (an infinite score: exp(inf - inf) in a single call too), makes the row NaN. A part whose
    weight ``exp(lse_p - lse)`` is exactly 0 (underflow) is skipped, so a non-finite output in it
    does not leak into the row, as the kernels' rule for non-finite values says.
    """
    P = part_out.shape[0]
    Ev = part_out.shape[2]
    dt = out.dtype
    consts = np.array([-np.inf, 0.0], dtype=dt)  # typed constants: no float64 promotion
    neg_inf, zero = consts[0], consts[1]
    m = neg_inf
    for p in range(P):
        x = part_lse[p, n]
        if x > m or x != x:  # a NaN sticks: it must not read as "every part empty"
            m = x
    if m == neg_inf:
        for c in range(Ev):
            out[n, c] = zero
        lse[n] = neg_inf
        return
    # NaN or +inf in m makes every weight below NaN (exp(inf - inf)), so the row is NaN
    total = zero
    for p in range(P):
        total += fast_exp(part_lse[p, n] - m)  # exp(-inf - m) = 0: empty parts add nothing
    inv = 1.0 / total
    for c in range(Ev):
        out[n, c] = zero
    for p in range(P):
        w = fast_exp(part_lse[p, n] - m) * inv
        if w == zero:  # an empty or underflowed part: its (ignored) output must not leak
            continue
        for c in range(Ev):
            out[n, c] += w * part_out[p, n, c]
    lse[n] = m + np.log(total)


@njit(parallel=True, cache=_CACHE, error_model="numpy")
def _merge_rows(part_out, part_lse, out, lse):
    """``_merge_row`` over every row: ``part_out`` (P, N, Ev), ``part_lse`` (P, N), ``out``
    (N, Ev), ``lse`` (N,), one dtype (float32 or float64), C order."""
    for n in prange(part_lse.shape[1]):
        _merge_row(part_out, part_lse, n, out, lse)
