"""Which keys the rows of a packed sequence see, and how the packed-batch kernels cut a tile of
them (``varlen_flash``, ``varlen_bwd``): sequence rows ``i`` at positions ``off + i`` (bottom-right
alignment), causal ``j <= p``, a window ``p - left <= j <= p + right`` (``-1``: no limit)."""

from numba import njit

from ...runtime.jit_cache import cache_enabled

_CACHE = cache_enabled()

__all__ = ["visible_rows", "key_range", "diagonal_split"]


@njit(cache=_CACHE, inline="always")
def visible_rows(j, i0, nq, off, causal, left, right):
    """``(first, last)``: the rows ``i0 + first ... i0 + last`` (of ``nq`` from ``i0``; empty if
    first > last) that see key ``j``, rows at positions ``off + i``."""
    first = 0
    if causal:
        first = max(first, j - off - i0)
    if right >= 0:
        first = max(first, j - right - off - i0)
    last = nq - 1
    if left >= 0:
        last = min(last, j + left - off - i0)
    return first, last


@njit(cache=_CACHE, inline="always")
def key_range(i0, i1, off, S, causal, left, right):
    """``(lo, hi)``: the keys ``lo ... hi - 1`` that rows ``i0 ... i1 - 1`` see between them (each
    row's visible keys move right with the row)."""
    hi = S
    if causal:
        hi = min(hi, off + i1)
    if right >= 0:
        hi = min(hi, off + i1 - 1 + right + 1)
    lo = 0 if left < 0 else max(0, off + i0 - left)
    return lo, max(lo, hi)


@njit(cache=_CACHE, inline="always")
def diagonal_split(i0, i1, j0, j1, off, S, causal, left, right, strip):
    """``(d, e)`` of the tile of query rows ``i0 ... i1 - 1`` and key tile ``j0 ... j1 - 1``, whose
    rows see keys up to ``e - 1`` between them: the tile's scores and values products take keys
    ``j0 ... d - 1`` for all its rows at once, then keys ``d ... e - 1`` in strips of ``strip``
    rows, each up to the last key a row of the strip sees. ``d < e`` where a causal or
    right-window diagonal crosses the tile (its first row does not see key ``e - 1``) and
    ``strip`` is under its rows: ``d`` is the first key hidden from its first row (``j0`` where
    that is under ``strip`` keys past it), so the strips skip most of the hidden triangle (as
    FlashAttention computes only the diagonal block of a causal row block) while the keys every
    row sees keep the whole tile's product. Else ``d = e``: one product. The backward
    (``varlen_bwd``) recomputes the scores with the same products."""
    _, hi = key_range(i0, i1, off, S, causal, left, right)
    e = max(j0, min(j1, hi))
    if strip < 1 or strip >= i1 - i0:
        return e, e
    _, first_hi = key_range(i0, i0 + 1, off, S, causal, left, right)
    d = max(j0, min(e, first_hi))
    return (j0 if d - j0 < strip else d), e
