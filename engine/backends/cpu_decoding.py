"""The ``cpu`` backend's ``decode``: lays out a validated ``DecodeProblem`` for the split-KV kernel."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ..config import (
    CPU_SERIAL_MAX_WORK,
    DECODE_BLOCK_K,
    DECODE_BLOCK_ROWS,
    DECODE_FUSED_ROWS,
    DECODE_MAX_SPLITS,
    DECODE_MIN_SPLIT_KEYS,
)
from ..decode_validation import DecodeProblem
from ..kernels.half_floats import BFLOAT16_BITS, FLOAT16_BITS
from ..kvcache import new_entries_written
from ..threads import get_num_threads, kernel_call_guard

__all__ = ["run_decode", "pick_num_splits"]

_NO_PIN = contextlib.nullcontext()


def pick_num_splits(tasks: int, max_keys: int, threads: int) -> int:
    """How many chunks to split each sequence's keys into, when the caller did not say.

    ``tasks`` = sequences x cache heads x row blocks. Enough tasks already keep every thread busy:
    1. Otherwise the split balances the waves of tasks over the threads (a wave at 3/4 occupancy
    wastes a quarter of the machine): the smallest split whose balance is within 85% of the best
    one, no split holding fewer than ``DECODE_MIN_SPLIT_KEYS`` keys (FlashAttention's heuristic for
    its ``num_splits=0``, with threads for streaming multiprocessors).
    """
    if tasks >= threads or max_keys < 2 * DECODE_MIN_SPLIT_KEYS:
        return 1  # (checked first: the common case costs nothing)
    most = max(1, min(DECODE_MAX_SPLITS, max_keys // DECODE_MIN_SPLIT_KEYS))
    balance = []
    for s in range(1, most + 1):
        waves = tasks * s / threads
        balance.append(waves / math.ceil(waves))
    best = max(balance)
    return next(s for s, e in enumerate(balance, 1) if e >= 0.85 * best)


def _pages(cache: np.ndarray) -> np.ndarray:
    """The cache as (pages, Hkv, page_size, D) of the compute dtype or uint16 bits (no copy)."""
    return cache.view(np.uint16) if cache.dtype.itemsize == 2 else cache


_kernel_module = None


def _kernels():
    """The kernel module, imported on first use (``import engine`` compiles nothing)."""
    global _kernel_module
    if _kernel_module is None:
        from ..kernels import cpu_decode

        _kernel_module = cpu_decode
    return _kernel_module


def run_decode(problem: DecodeProblem, blas_pin):
    """Write the new entries, then run the kernel; ``(out, lse)`` in the query's dtype. If anything
    after the write raises (a mod Numba cannot compile, an allocation), the written slots get their
    old contents back first."""
    with new_entries_written(problem):
        return _attend(problem, blas_pin)


def _attend(problem: DecodeProblem, blas_pin):
    B, Hq, L, Ev = problem.batch, problem.num_q_heads, problem.L, problem.Ev
    compute = problem.compute_dtype
    q = np.ascontiguousarray(problem.query, dtype=compute)
    half_kind = 0
    if problem.cache_dtype.itemsize == 2:
        half_kind = FLOAT16_BITS if problem.cache_dtype == np.float16 else BFLOAT16_BITS
    if problem.page_table is None:
        table = np.arange(B, dtype=np.int32).reshape(B, 1)
    else:
        table = np.ascontiguousarray(problem.page_table, dtype=np.int32)
    seqlens_k = problem.seqlens_k
    group = problem.group
    row_blocks = math.ceil(group * L / DECODE_BLOCK_ROWS)
    tasks = B * problem.num_kv_heads * row_blocks
    splits = problem.num_splits
    if splits is None:
        threads = get_num_threads()
        splits = 1 if tasks >= threads else pick_num_splits(tasks, int(seqlens_k.max()), threads)
    splits = min(splits, max(1, int(seqlens_k.max())))  # a split with no key does nothing
    N = B * Hq * L
    out = np.empty((N, Ev), dtype=compute)
    lse = np.empty(N, dtype=compute)
    if splits > 1:
        part_out = np.empty((splits, N, Ev), dtype=compute)
        part_lse = np.empty((splits, N), dtype=compute)
    else:
        part_out, part_lse = out.reshape(1, N, Ev), lse.reshape(1, N)
    left, right = problem.window
    # keys read: tiny calls run serially (the thread pool's wake-up costs more than it gains)
    work = int(seqlens_k.sum()) * problem.num_q_heads * L * (problem.E + Ev)
    serial = splits == 1 and work <= CPU_SERIAL_MAX_WORK
    kernel = _kernels().decode_kernel(problem.score_mod, problem.mask_mod, serial)
    # few rows per task: the kernel's own loops, no BLAS call, so nothing to pin (it costs microseconds)
    small = group * L <= DECODE_FUSED_ROWS
    with kernel_call_guard(), _NO_PIN if small else blas_pin():
        kernel(
            q,
            _pages(problem.k_cache),
            _pages(problem.v_cache),
            table,
            seqlens_k,
            problem.is_causal,
            left,
            right,
            problem.scale,
            group,
            half_kind,
            bool(half_kind or problem.page_table is not None),
            splits,
            DECODE_BLOCK_K,
            DECODE_BLOCK_ROWS,
            DECODE_FUSED_ROWS,
            problem.mod_args,
            problem.score_mod is not None,
            problem.mask_mod is not None,
            part_out,
            part_lse,
            out,
            lse,
        )
    out = out.reshape(problem.out_shape)
    lse = lse.reshape(problem.lse_shape)
    if problem.dtype != compute:
        out, lse = out.astype(problem.dtype), lse.astype(problem.dtype)
    return out, lse
