"""Classifying (query tile, key tile) blocks of a ``mask_mod`` as empty, partial or full."""

from numba import njit, prange

from .kinds import TILE_EMPTY, TILE_FULL, TILE_PARTIAL


# not disk-cached: it always takes the user's mask_mod as an argument, and Numba never finds a
# specialisation on a function argument in its cache again (compiled once per process instead)
@njit(parallel=True)
def _classify_blocks(mask_mod, mod_args, L, S, block_q, block_k, kinds):
    """kinds[b, h, qb, kb] = TILE_EMPTY (no element allowed), TILE_FULL (all) or TILE_PARTIAL, per tile.

    ``kinds`` is (Bm, Hm, ceil(L / block_q), ceil(S / block_k)); ``mask_mod(b, h, i, j, *mod_args)``.
    """
    Bm, Hm, nqb, nkb = kinds.shape
    for task in prange(Bm * Hm * nqb):
        b = task // (Hm * nqb)
        rest = task - b * (Hm * nqb)
        h = rest // nqb
        qb = rest - h * nqb
        i0 = qb * block_q
        i1 = min(i0 + block_q, L)
        for kb in range(nkb):
            j0 = kb * block_k
            j1 = min(j0 + block_k, S)
            allowed = 0
            for i in range(i0, i1):
                for j in range(j0, j1):
                    if mask_mod(b, h, i, j, *mod_args):
                        allowed += 1
            kinds[b, h, qb, kb] = (
                TILE_EMPTY if allowed == 0 else TILE_FULL if allowed == (i1 - i0) * (j1 - j0) else TILE_PARTIAL
            )
