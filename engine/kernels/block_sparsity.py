"""Classifying (query tile, key tile) blocks of a ``mask_mod`` as empty, partial or full.

The ``mask_mod`` is bound as a global of the compiled code (``kernels.specialise``), not passed as
an argument: a jitted function as an argument costs Numba's dispatcher tens of microseconds of
typing on every call (numba#2952), and a call without ``block_mask`` classifies on every call.
"""

from numba import njit, prange

from ..runtime.jit_cache import cache_enabled
from .identity_mods import no_mask_mod
from .kinds import TILE_EMPTY, TILE_FULL, TILE_PARTIAL
from .specialise import cache_tag, named
from .task_pointer import raise_cause, rerun_serially

__all__ = ["classify_blocks"]

#: the mask_mod the kernel below calls; ``classify_blocks`` re-binds it per mask_mod
_MASK_MOD = no_mask_mod


@njit(parallel=True)
def _classify_blocks(mod_args, L, S, block_q, block_k, kinds):
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
                    if _MASK_MOD(b, h, i, j, *mod_args):
                        allowed += 1
            kinds[b, h, qb, kb] = (
                TILE_EMPTY if allowed == 0 else TILE_FULL if allowed == (i1 - i0) * (j1 - j0) else TILE_PARTIAL
            )


#: the kernel built for each (mask_mod, parallel) in this process
_by_mod: dict = {}
#: what ``kinds`` holds before the kernel runs: a tile still holding it was never classified
_UNSET = -1


def _kernel(mask_mod, parallel: bool):
    kernel = _by_mod.get((mask_mod, parallel))
    if kernel is None:
        fn = _classify_blocks.py_func
        tag = cache_tag(mask_mod)
        env = dict(fn.__globals__, _MASK_MOD=mask_mod)
        name = fn.__name__ + ("_mod" if parallel else "_mod_serial")
        kernel = _by_mod[mask_mod, parallel] = njit(parallel=parallel, cache=bool(tag) and cache_enabled())(
            named(fn.__code__, env, name, tag)
        )
    return kernel


def classify_blocks(mask_mod, mod_args, L, S, block_q, block_k, kinds) -> None:
    """:func:`_classify_blocks` for this (jitted) ``mask_mod``: built once per mask_mod (and
    disk-cached for the built-in variants' mods, as the attention kernels are). An exception the
    mask_mod raises reaches the caller as itself, also one raised in a worker thread (which Numba
    drops: the tile it was classifying stays unset, and the serial build runs again to raise it)."""
    kinds.fill(_UNSET)
    try:
        _kernel(mask_mod, True)(mod_args, L, S, block_q, block_k, kinds)
    except SystemError as e:
        raise_cause(e)
    if (kinds == _UNSET).any():
        rerun_serially(_kernel(mask_mod, False), (mod_args, L, S, block_q, block_k, kinds), "the mask_mod's tile map")
