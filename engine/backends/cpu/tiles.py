"""Tile sizes and work splits of the ``cpu`` backend's forward and backward kernels."""

from __future__ import annotations

import numpy as np

from ...runtime.config import (
    BLAS_SINGLE_THREAD_MNK,
    CPU_BIG_BLOCK_Q,
    CPU_BLOCK_K,
    CPU_BLOCK_Q,
    CPU_BWD_BLOCK_Q,
    CPU_BWD_MIN_TASKS_PER_THREAD,
)

__all__ = ["tile_sizes", "backward_tile_sizes", "backward_splits", "split_bounds"]


def tile_sizes(L: int, E: int, Ev: int, blas_pinned: bool = False) -> tuple[int, int]:
    """(block_q, block_k) for a problem. ``blas_pinned``: BLAS is held at one thread, so tiles
    may be large (128 x 256, 64 x 256 for heads over 128 wide). Otherwise block_k is a multiple of
    16, 16 to 256, and block_q * block_k * max(E, Ev) <= the BLAS single-thread threshold wherever
    E, Ev <= 16384 (block_q shrinks for very large heads)."""
    width = max(E, Ev, 1)
    if blas_pinned:
        return max(1, min(CPU_BIG_BLOCK_Q if width <= 128 else CPU_BLOCK_Q, L)), CPU_BLOCK_K
    block_q = max(1, min(CPU_BLOCK_Q, L))
    block_k = max(16, min(CPU_BLOCK_K, BLAS_SINGLE_THREAD_MNK // (block_q * width) // 16 * 16))
    if block_q * block_k * width > BLAS_SINGLE_THREAD_MNK:
        block_q = max(1, BLAS_SINGLE_THREAD_MNK // (block_k * width))
    return block_q, block_k


def backward_tile_sizes(L: int, S: int, E: int, Ev: int, blas_pinned: bool = False) -> tuple[int, int, int]:
    """(block_q, block_k, fq) of the backward kernel. The forward's tiles are (fq, block_k)
    (:func:`tile_sizes`); the backward's key tiles are the forward's and its query tiles a
    multiple of fq, about ``CPU_BWD_BLOCK_Q`` rows when BLAS is held at one thread (one fq
    otherwise, under OpenBLAS's threshold), so that it recomputes each score with the very
    product the forward used."""
    fq, block_k = tile_sizes(L, E, Ev, blas_pinned=blas_pinned)
    block_q = fq * max(1, CPU_BWD_BLOCK_Q // fq) if blas_pinned else fq
    return max(1, min(block_q, L)), max(1, min(block_k, S)), fq


def backward_splits(tasks: int, threads: int, key_tiles: int) -> int:
    """How many runs of key tiles each (batch, kv head) is cut into, so that every thread has
    work: 1 when ``tasks`` (batch x kv heads) is a multiple of ``threads``; else the smallest
    count that makes ``tasks * splits`` a multiple of ``threads`` or at least
    ``CPU_BWD_MIN_TASKS_PER_THREAD * threads``; never more than ``key_tiles``. A function of the
    thread count and the shapes only: the gradients depend on it (the dQ sums' order), nothing
    else does."""
    splits = 1
    while (tasks * splits) % threads and tasks * splits < CPU_BWD_MIN_TASKS_PER_THREAD * threads:
        splits += 1
    return max(1, min(splits, key_tiles))


def split_bounds(work: np.ndarray, splits: int) -> np.ndarray:
    """Cut key tiles with these work counts into ``splits`` contiguous runs of about equal work:
    int64 bounds, ``splits + 1`` entries from 0 to ``len(work)``, each inner bound where the
    cumulative work comes closest to its share."""
    total = np.concatenate([[0.0], np.cumsum(work, dtype=np.float64)])  # work before bound i
    targets = total[-1] * np.arange(1, splits) / splits
    above = np.clip(np.searchsorted(total, targets), 1, len(total) - 1)  # total[above] >= target
    inner = np.where(total[above] - targets <= targets - total[above - 1], above, above - 1)
    bounds = np.concatenate([[0], inner, [len(work)]]).astype(np.int64)
    return np.maximum.accumulate(bounds)
