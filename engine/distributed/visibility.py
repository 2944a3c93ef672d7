"""Which (query chunk, key chunk) pairs see nothing, everything, or part: decided while the graph
is built, so empty pairs never become tasks and only boundary pairs carry a mask.

Causal (top-left, as torch): queries ``[a0, a1)`` see keys ``[c0, c1)`` partly when
``c0 <= a1 - 1``, fully when ``c1 - 1 <= a0``. A ``mask_mod`` is evaluated once, on the client,
with :func:`engine.create_block_mask` at tiles that divide every chunk (the chunk size itself
when chunks are regular, else the greatest common divisor of the chunk sizes), and the tile map
is folded into a chunk map. That evaluates the mask at every (b, h, q_idx, kv_idx): the same
work as one pass of the mask over the scores, done once per graph.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels.kinds import TILE_EMPTY, TILE_FULL, TILE_PARTIAL

__all__ = ["causal_kinds", "mask_mod_kinds", "starts", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = TILE_EMPTY, TILE_PARTIAL, TILE_FULL


def starts(chunks: tuple) -> np.ndarray:
    """Global index of each chunk's first element."""
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)


def causal_kinds(q_chunks: tuple, k_chunks: tuple) -> np.ndarray:
    """(nq, nk) int8: EMPTY, PARTIAL or FULL for top-left causal attention."""
    a0 = starts(q_chunks)[:, None]
    a1 = a0 + np.asarray(q_chunks)[:, None]
    c0 = starts(k_chunks)[None, :]
    c1 = c0 + np.asarray(k_chunks)[None, :]
    kinds = np.full((len(q_chunks), len(k_chunks)), PARTIAL, np.int8)
    kinds[c0 > a1 - 1] = EMPTY
    kinds[(c1 - 1 <= a0) & ~(c0 > a1 - 1)] = FULL
    return kinds


def _tile(chunks: tuple) -> int:
    """A tile size whose multiples hold every chunk boundary."""
    sizes = [c for c in chunks if c]
    if not sizes:
        return 1
    if all(c == sizes[0] for c in sizes[:-1]) and sizes[-1] <= sizes[0]:
        return sizes[0]  # regular: one tile per chunk
    return math.gcd(*sizes)


def mask_mod_kinds(
    mask_mod,
    mod_args: tuple,
    batch_shape: tuple,
    Hq: int,
    L: int,
    S: int,
    batch_chunks: tuple,
    head_chunks: tuple,
    q_chunks: tuple,
    k_chunks: tuple,
) -> np.ndarray:
    """``(n_batch_blocks..., n_head_blocks, nq, nk)`` int8: the mask_mod's kind per block pair, over
    every batch entry and head of the block (EMPTY only if empty for all of them)."""
    from ..problems.mods import create_block_mask

    tq, tk = _tile(q_chunks), _tile(k_chunks)
    B = math.prod(batch_shape)
    fine = create_block_mask(mask_mod, B, Hq, L, S, mod_args=mod_args, block_q=tq, block_k=tk).kinds
    fine = fine.reshape(tuple(batch_shape) + fine.shape[1:])
    visible, full = fine != EMPTY, fine == FULL
    # where each block begins along each axis of the tile map (chunk starts are multiples of tiles)
    chunks = list(batch_chunks) + [head_chunks, q_chunks, k_chunks]
    tiles = [1] * (len(batch_chunks) + 1) + [tq, tk]
    for axis, (c, t) in enumerate(zip(chunks, tiles)):
        visible = _reduce_chunks(np.logical_or, visible, c, t, axis)
        full = _reduce_chunks(np.logical_and, full, c, t, axis)
    kinds = np.where(full, FULL, np.where(visible, PARTIAL, EMPTY)).astype(np.int8)
    return kinds


def _reduce_chunks(ufunc, a: np.ndarray, chunks: tuple, tile: int, axis: int) -> np.ndarray:
    """``ufunc`` reduced over each chunk's tiles along ``axis``; an empty chunk (size 0, anywhere,
    trailing ones included: ``reduceat`` can neither start past the end nor reduce nothing) gets
    False, so its pairs are EMPTY and never become tasks."""
    sizes = np.asarray(chunks, np.int64)
    nonempty = sizes > 0
    shape = list(a.shape)
    shape[axis] = len(chunks)
    out = np.zeros(shape, bool)
    if nonempty.any():
        reduced = ufunc.reduceat(a, starts(chunks)[nonempty] // tile, axis=axis)
        index = [slice(None)] * a.ndim
        index[axis] = nonempty
        out[tuple(index)] = reduced
    return out


def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Both masks at once: EMPTY if either is, FULL if both are, else PARTIAL."""
    return np.where((a == EMPTY) | (b == EMPTY), EMPTY, np.where((a == FULL) & (b == FULL), FULL, PARTIAL)).astype(
        np.int8
    )
