"""Tile sizes and work splits of the ``cpu`` backend's forward and backward kernels.

The forward's tiles (query rows x key rows, and query rows per parallel task) come from
measurement where there is one for the problem's class (``engine.backends.cpu.autotune``, kept by
``engine.runtime.tuning``), else from the fixed rule of :func:`tile_sizes`. The backward
recomputes the forward's scores with its tiles (:func:`backward_tile_sizes`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...runtime.config import (
    BLAS_SINGLE_THREAD_MNK,
    CPU_BIG_BLOCK_Q,
    CPU_BLOCK_K,
    CPU_BLOCK_Q,
    CPU_BWD_BLOCK_Q,
    CPU_BWD_MIN_TASKS_PER_THREAD,
    CPU_DIAGONAL_STRIP,
    CPU_MIN_TASKS_PER_THREAD,
    CPU_TASK_ROWS,
    CPU_TUNE_MAX_WIDTH,
    CPU_VARLEN_TASK_ROWS,
)
from ...runtime.gemm_providers import width_class
from ...runtime.tuning import lookup

__all__ = [
    "TilePlan",
    "tile_class",
    "tile_key",
    "valid_tiles",
    "forward_tiles",
    "tile_sizes",
    "backward_tile_sizes",
    "diagonal_strip",
    "varlen_sub_tiles",
    "backward_splits",
    "split_bounds",
]


class TilePlan(NamedTuple):
    """The forward kernel's tiles for one call: ``block_q`` query rows x ``block_k`` key rows per
    tile, ``sub_tiles`` query tiles per parallel task; ``tuned``: measured on this machine (else
    the fixed rule)."""

    block_q: int
    block_k: int
    sub_tiles: int
    tuned: bool


#: the candidates ``autotune`` measures (and the only values a stored choice may hold)
BLOCK_Q_CHOICES = (32, 64, 128, 256)
BLOCK_K_CHOICES = (64, 128, 256, 512)
TASK_ROWS_CHOICES = (32, 64, 128, 256, 512)


def tile_class(L: int, E: int, Ev: int) -> tuple[int, str] | None:
    """(width class, length class) of a problem for tuning: head widths up to 64 and up to 128
    wide, query lengths up to 768 ("short"), up to 2048 ("medium") and beyond ("long"); None for
    wider heads (the fixed rule)."""
    width = max(E, Ev, 1)
    if width > CPU_TUNE_MAX_WIDTH:
        return None
    return width_class(width), ("short" if L <= 768 else "medium" if L <= 2048 else "long")


def tile_key(provider: str, dtype_name: str, width: int, length: str) -> str:
    """The tuning cache's key of one class's tiles."""
    return f"cpu-forward-tiles/{provider}/{dtype_name}/w{width}/{length}"


def valid_tiles(value: dict) -> bool:
    """Whether a stored choice is one :func:`forward_tiles` can use (a file written by someone
    else, or by another version, is never trusted further than this)."""
    bq, bk, rows = value["block_q"], value["block_k"], value["task_rows"]
    return (
        bq in BLOCK_Q_CHOICES
        and bk in BLOCK_K_CHOICES
        and rows in TASK_ROWS_CHOICES
        and rows % bq == 0
        and all(type(x) is int for x in (bq, bk, rows))
    )


def forward_tiles(
    L: int,
    E: int,
    Ev: int,
    dtype_name: str,
    provider: str,
    blas_pinned: bool,
    tasks_per_row_block: int,
    threads: int,
    S: int | None = None,
) -> TilePlan:
    """The forward's tiles: the measured choice of the problem's class (:func:`tile_class`) for
    this provider and dtype where one is stored, else :func:`tile_sizes` with
    ``CPU_TASK_ROWS`` query rows per task. Either way, rows per task shrink (never below one
    tile) until there are at least ``CPU_MIN_TASKS_PER_THREAD`` tasks per thread
    (``tasks_per_row_block``: batch x heads, the tasks of each block of query rows), so every
    thread has work. ``S`` (the keys, when one length serves every call): a key tile no longer
    than S rounded up to 16 rows, so that keys fewer than a tile fill theirs when S is a multiple
    of 16 and its products take the provider's generated GEMM for full tiles (measured on an
    Intel Xeon at (4, 8, 32, 64): 12% of the call), at most ``block_k / 16`` more shapes. A
    function of its arguments and the tuning cache only."""
    cls = tile_class(L, E, Ev) if blas_pinned else None
    got = lookup(tile_key(provider, dtype_name, *cls), valid_tiles) if cls is not None else None
    if got is not None:
        block_q, block_k, rows = got["block_q"], got["block_k"], got["task_rows"]
    else:
        (block_q, block_k), rows = tile_sizes(L, E, Ev, blas_pinned=blas_pinned), CPU_TASK_ROWS
    block_q = max(1, min(block_q, L))
    if S is not None:
        block_k = min(block_k, max(16, -(-S // 16) * 16))
    sub_tiles = max(1, rows // block_q)
    while sub_tiles > 1 and tasks_per_row_block * -(-L // (block_q * sub_tiles)) < CPU_MIN_TASKS_PER_THREAD * threads:
        sub_tiles //= 2
    return TilePlan(block_q, block_k, sub_tiles, got is not None)


def diagonal_strip(block_q: int) -> int:
    """Query rows per strip of a tile that a causal or right-window diagonal crosses, in the
    packed-batch forward and its backward (``kernels.cpu.varlen_rows.diagonal_split``): the
    same for both, so the backward recomputes each score with the forward's product; ``block_q``
    (one product) where the strips would be as tall as the tile."""
    return max(1, min(CPU_DIAGONAL_STRIP, block_q))


def varlen_sub_tiles(plan: TilePlan, q_lens: np.ndarray, heads: int, threads: int, width: int) -> int:
    """Query tiles per task of the packed-batch forward (``kernels.cpu.varlen_flash``): up to
    ``CPU_VARLEN_TASK_ROWS`` rows for heads up to 64 wide (``width``: the wider of E and Ev; wider
    heads proportionally fewer rows, so the task's query and accumulator scratch stays the size
    measured), halved (never under the dense forward's ``plan.sub_tiles``) while the batch
    (``q_lens`` query rows per sequence, ``heads`` query heads) would have fewer than
    ``CPU_MIN_TASKS_PER_THREAD`` tasks per thread. The results do not depend on it."""
    rows = CPU_VARLEN_TASK_ROWS * 64 // max(64, width)
    sub = max(plan.sub_tiles, rows // plan.block_q)
    while sub > plan.sub_tiles:
        rows = plan.block_q * sub
        if heads * int(np.sum(-(-q_lens // rows))) >= CPU_MIN_TASKS_PER_THREAD * threads:
            break
        sub //= 2
    return max(sub, plan.sub_tiles)


def tile_sizes(L: int, E: int, Ev: int, blas_pinned: bool = False) -> tuple[int, int]:
    """(block_q, block_k) of the fixed rule. ``blas_pinned``: BLAS is held at one thread, so tiles
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


def backward_tile_sizes(
    L: int, S: int, E: int, Ev: int, blas_pinned: bool = False, dtype_name: str = "float32", provider: str = "numpy"
) -> tuple[int, int, int]:
    """(block_q, block_k, fq) of the backward kernel. The forward's tiles are (fq, block_k)
    (:func:`forward_tiles` for this dtype and GEMM provider: measured or the fixed rule); the
    backward's key tiles are the forward's (``block_k`` may exceed S, as the forward's) and its
    query tiles a multiple of fq, about ``CPU_BWD_BLOCK_Q`` rows when BLAS is held at one thread
    (one fq otherwise, under OpenBLAS's threshold), so that it recomputes each score with the
    very product the forward used."""
    plan = forward_tiles(L, E, Ev, dtype_name, provider, blas_pinned, 1, 1, S=S)
    fq, block_k = plan.block_q, plan.block_k
    block_q = fq * max(1, CPU_BWD_BLOCK_Q // fq) if blas_pinned else fq
    return max(1, min(block_q, L)), block_k, fq


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
