"""Classifying (query tile, key tile) blocks of a ``mask_mod`` as empty, partial or full.

One parallel driver, compiled once (and disk-cached) for every ``mask_mod``: its task calls the
mask's loop over one row of tiles (:func:`classify_row`, built per ``mask_mod`` with the mod
inlined) through its address, with the ``mod_args`` packed behind an address where their type
allows (``engine.kernels.mod_calls``), as the attention kernels do; a new ``mask_mod`` compiles
that loop only (a fraction of a second instead of the 1-2.5 s of a parallel kernel). Not a jitted
function as an argument: that costs Numba's dispatcher tens of microseconds of typing on every
call (numba#2952), and a call without ``block_mask`` classifies on every call.
"""

import numpy as np
from numba import njit, prange, types

from ..runtime.jit_cache import cache_enabled
from .identity_mods import no_mask_mod
from .kinds import TILE_EMPTY, TILE_FULL, TILE_PARTIAL
from .mod_calls import MOD_CALL_MISMATCH, BoundLoops, ModLoop, mod_loop, task_mod_args
from .mod_kernels import serial_version
from .task_pointer import raise_cause, rerun_serially

__all__ = ["classify_blocks", "classify_row"]

_CACHE = cache_enabled()
#: the mask_mod and its arguments the loop below reads; bound per mask_mod (engine.kernels.mod_calls)
_MASK_MOD = no_mask_mod
_USER_ARGS = None


def classify_row(kinds, b, h, i0, i1, block_k, S, mod_args):
    """``kinds[kb]`` = TILE_EMPTY (``mask_mod(b, h, i, j, *mods)`` allows no element), TILE_FULL
    (all) or TILE_PARTIAL for the tiles of query rows ``i0 ... i1 - 1`` and keys
    ``kb * block_k ...`` (below ``S``): one row of tiles, the mask's loop."""
    user = _USER_ARGS(mod_args)
    for kb in range(kinds.shape[0]):
        j0 = kb * block_k
        j1 = min(j0 + block_k, S)
        allowed = 0
        for i in range(i0, i1):
            for j in range(j0, j1):
                if _MASK_MOD(b, h, i, j, *user):
                    allowed += 1
        kinds[kb] = TILE_EMPTY if allowed == 0 else TILE_FULL if allowed == (i1 - i0) * (j1 - j0) else TILE_PARTIAL


@njit(cache=_CACHE)
def _classify_task(task, mod_args, L, S, block_q, block_k, kinds):
    """One row of tiles, ``kinds[b, h, qb]`` (a function of its own: a ``raise`` in a ``prange``
    body would keep the loop from running in parallel)."""
    Bm, Hm, nqb, nkb = kinds.shape
    b = task // (Hm * nqb)
    rest = task - b * (Hm * nqb)
    h = rest // nqb
    qb = rest - h * nqb
    i0 = qb * block_q
    i1 = min(i0 + block_q, L)
    b_, h_, i0_, i1_ = np.int64(b), np.int64(h), np.int64(i0), np.int64(i1)
    if not mod_loop(0, mod_args, kinds[b, h, qb], b_, h_, i0_, i1_, np.int64(block_k), np.int64(S), mod_args):
        raise RuntimeError(MOD_CALL_MISMATCH)


@njit(parallel=True, cache=_CACHE)
def _classify_blocks(mod_args, L, S, block_q, block_k, kinds):
    """kinds[b, h, qb, kb] for every tile (:func:`classify_row`), one task per row of tiles.

    ``kinds`` is (Bm, Hm, ceil(L / block_q), ceil(S / block_k)) int8, C order; ``mod_args`` the
    task's (the loop's address and tag, then the user's packed or as they are).
    """
    Bm, Hm, nqb, nkb = kinds.shape
    for task in prange(Bm * Hm * nqb):
        _classify_task(np.int64(task), mod_args, L, S, block_q, block_k, kinds)


_classify_blocks_serial = serial_version(_classify_blocks, {}, _CACHE)


def _row_types(args_ty, mod_args_ty):
    return (types.Array(types.int8, 1, "C"),) + (types.int64,) * 6 + (mod_args_ty,)


_LOOPS = (ModLoop(classify_row, ("_MASK_MOD",), _row_types),)
#: the loops built for each mask_mod in this process, and the task mod_args' maker per (mask_mod, type)
_by_mod: dict = {}
_makers: dict = {}
#: what ``kinds`` holds before the kernel runs: a tile still holding it was never classified
_UNSET = -1


def classify_blocks(mask_mod, mod_args, L, S, block_q, block_k, kinds) -> None:
    """:func:`_classify_blocks` for this (jitted) ``mask_mod``: its loop built once per mask_mod
    (and disk-cached for the built-in variants' mods, as the attention kernels' are). An
    exception the mask_mod raises reaches the caller as itself, also one raised in a worker thread
    (which Numba drops: the tile row it was classifying stays unset, and the serial build runs
    again to raise it)."""
    key = (mask_mod, _classify_blocks.typeof_pyval(mod_args))
    make = _makers.get(key)
    if make is None:
        loops = _by_mod.get(mask_mod)
        if loops is None:
            loops = _by_mod.setdefault(mask_mod, BoundLoops(_LOOPS, {"_MASK_MOD": mask_mod}, {}))
        make = _makers[key] = task_mod_args(loops, len(_LOOPS), None, key[1])[1]
    task_args, buf = make(mod_args)  # noqa: F841  (buf: kept alive, the packed mod_args)
    kinds.fill(_UNSET)
    try:
        _classify_blocks(task_args, L, S, block_q, block_k, kinds)
    except SystemError as e:
        raise_cause(e)
    if (kinds == _UNSET).any():
        rerun_serially(_classify_blocks_serial, (task_args, L, S, block_q, block_k, kinds), "the mask_mod's tile map")
