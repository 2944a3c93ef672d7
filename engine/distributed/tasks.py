"""What the tasks of a distributed attention graph run on the workers.

Every function here is deterministic: the same blocks in give the same bits out, whichever
worker runs it and however often (the ``cpu`` kernel reduces each query row over its keys in a
fixed order; the merge is per row). That, and a merge tree fixed when the graph is built, is
why a result recomputed after a lost worker is identical, bit for bit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import scaled_dot_product_attention as _sdpa
from ..merge import merge_attention
from .threads import task_threads

__all__ = [
    "AttentionSpec",
    "PairInfo",
    "attend_pair",
    "merge_parts",
    "empty_block",
    "CAUSAL_NONE",
    "CAUSAL_TOP_LEFT",
    "CAUSAL_OFFSET",
]

#: how a (query chunk, key chunk) pair is causal: not at all (every key visible, or no causal
#: mask), top-left on the pair itself (its first query and first key share a global index), or
#: offset (a boolean mask built in the task: key j visible from row i iff j <= i + offset)
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_OFFSET = 0, 1, 2


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """What every task of one call shares: one key in the graph, so each worker receives it once.

    ``score_mod``/``mask_mod`` are the caller's functions; ``mods_token`` names them in each
    worker's cache of index-shifted, compiled mods (so a worker compiles them once per process,
    not once per call)."""

    scale: float
    enable_gqa: bool
    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    mod_args: tuple = ()
    mods_token: str = ""


@dataclass(frozen=True, eq=False)
class PairInfo:
    """One (query chunk, key chunk) pair of an output block: where it sits in the whole problem.

    ``bmap[b]`` is the global flattened batch index of the block's batch entry ``b``; ``h0``,
    ``q0``, ``k0`` the global indices of its first query head, query row and key. Only the mods
    read them (they see global indices, as in a single call)."""

    causal: int
    offset: int
    use_mask_mod: bool
    bmap: np.ndarray = field(repr=False)
    h0: int
    q0: int
    k0: int


def attend_pair(spec: AttentionSpec, q, k, v, mask, info: PairInfo):
    """``(out, lse)`` of the block's queries over the pair's keys, on the ``cpu`` backend."""
    with task_threads():
        is_causal = info.causal == CAUSAL_TOP_LEFT
        if info.causal == CAUSAL_OFFSET:
            L, S = q.shape[-2], k.shape[-2]
            mask = np.arange(S)[None, :] <= np.arange(L)[:, None] + info.offset
        mods = {}
        if spec.score_mod is not None or (spec.mask_mod is not None and info.use_mask_mod):
            score_mod, mask_mod = shifted_mods(spec)
            mods = dict(
                score_mod=score_mod,
                mask_mod=mask_mod if info.use_mask_mod else None,
                mod_args=(info.bmap, info.h0, info.q0, info.k0) + tuple(spec.mod_args),
            )
        return _sdpa(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            scale=spec.scale,
            enable_gqa=spec.enable_gqa,
            backend="cpu",
            return_lse=True,
            **mods,
        )


def merge_parts(parts: list):
    """``engine.merge_attention`` over a list of ``(out, lse)``, in the list's order."""
    with task_threads():
        return merge_attention([p[0] for p in parts], [p[1] for p in parts])


def empty_block(out_shape: tuple, lse_shape: tuple, dtype: str):
    """The result of queries that see no key at all: zeros, and ``lse = -inf`` (as one call)."""
    return np.zeros(out_shape, dtype), np.full(lse_shape, -np.inf, dtype)


def take(pair: tuple, i: int, two_d: bool):
    """``pair[i]`` (out or lse of a merged block), without the added head axis of 2-D inputs."""
    x = pair[i]
    return x[0] if two_d else x


# -- mods that see global indices -------------------------------------------------------------
_shifted: dict[str, tuple] = {}
_shifted_lock = threading.Lock()


def shifted_mods(spec: AttentionSpec) -> tuple:
    """The caller's mods wrapped to take the pair's offsets as their first four ``mod_args``:
    ``mod(b, h, q_idx, kv_idx, bmap, h0, q0, k0, *args)`` calls the caller's mod at
    ``(bmap[b], h + h0, q_idx + q0, kv_idx + k0, *args)``. Built once per worker process per
    ``mods_token``; the kernel that calls them is then compiled once per process too."""
    with _shifted_lock:
        got = _shifted.get(spec.mods_token)
        if got is None:
            got = _shifted[spec.mods_token] = (_shift_score(spec.score_mod), _shift_mask(spec.mask_mod))
        return got


def _shift_score(score_mod):
    if score_mod is None:
        return None
    import numba

    from ..problems.mods import as_jit

    inner = as_jit(score_mod, "score_mod")

    @numba.njit(error_model="numpy")
    def shifted_score_mod(score, b, h, q_idx, kv_idx, bmap, h0, q0, k0, *args):
        return inner(score, bmap[b], h + h0, q_idx + q0, kv_idx + k0, *args)

    return shifted_score_mod


def _shift_mask(mask_mod):
    if mask_mod is None:
        return None
    import numba

    from ..problems.mods import as_jit

    inner = as_jit(mask_mod, "mask_mod")

    @numba.njit(error_model="numpy")
    def shifted_mask_mod(b, h, q_idx, kv_idx, bmap, h0, q0, k0, *args):
        return inner(bmap[b], h + h0, q_idx + q0, kv_idx + k0, *args)

    return shifted_mask_mod
