"""The ``cpu`` backend's decode op: lays out a validated ``DecodeProblem`` for the split-KV kernel
(``engine.kernels.cpu.decode``)."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ...kernels.cpu.half_floats import BFLOAT16_BITS, FLOAT16_BITS
from ...problems.decode import DecodeProblem
from ...problems.mods import compile_mods_alone
from ...runtime.config import (
    CPU_SERIAL_MAX_WORK,
    DECODE_BLOCK_K,
    DECODE_BLOCK_ROWS,
    DECODE_FUSED_ROWS,
)
from ...runtime.threads import get_num_threads, kernel_call_guard
from ..base import Op
from ..kvcache import new_entries_written, pick_num_splits
from .blas_pin import get_blas_pin
from .varlen import attend_packed

__all__ = ["CpuDecode"]

_NO_PIN = contextlib.nullcontext()


def _pages(cache: np.ndarray) -> np.ndarray:
    """The cache as (pages, Hkv, page_size, D) of the compute dtype or uint16 bits (no copy)."""
    return cache.view(np.uint16) if cache.dtype.itemsize == 2 else cache


_kernel_module = None


def _kernels():
    """The kernel module, imported on first use (``import engine`` compiles nothing)."""
    global _kernel_module
    if _kernel_module is None:
        from ...kernels.cpu import decode as cpu_decode

        _kernel_module = cpu_decode
    return _kernel_module


class CpuDecode(Op):
    problem_type = DecodeProblem
    dtypes = ("float16", "float32", "float64", "bfloat16")
    cache_dtypes = ("float16", "float32", "float64", "bfloat16")
    supports_mods = True
    supports_cu_seqlens_q = True

    def run(self, problem: DecodeProblem):
        """Write the new entries, then run the kernel; ``(out, lse)`` in the query's dtype. If
        anything after the write raises (a mod Numba cannot compile, an allocation), the written
        slots get their old contents back first. Packed queries (``cu_seqlens_q``) run on the
        ragged kernel (``varlen.attend_packed``)."""
        with new_entries_written(problem):
            if problem.packed:
                return attend_packed(problem)
            return _attend(problem, get_blas_pin())


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
    compile_mods_alone(problem.score_mod, problem.mask_mod, problem.mod_args, compute)
    kernel = _kernels().decode_kernel(problem.score_mod, problem.mask_mod, serial)
    # few rows per task: the kernel's own loops, no BLAS call, so nothing to pin (it costs microseconds)
    small = group * L <= DECODE_FUSED_ROWS
    with kernel_call_guard(), _NO_PIN if small else blas_pin():
        kernel(
            _kernels().DecodeArgs(
                q=q,
                k_pages=_pages(problem.k_cache),
                v_pages=_pages(problem.v_cache),
                page_table=table,
                seqlens_k=seqlens_k,
                causal=problem.is_causal,
                left=left,
                right=right,
                scale=problem.scale,
                group=group,
                half_kind=half_kind,
                gather=bool(half_kind or problem.page_table is not None),
                splits=splits,
                block_k=DECODE_BLOCK_K,
                block_rows=DECODE_BLOCK_ROWS,
                fused_rows=DECODE_FUSED_ROWS,
                has_score_mod=problem.score_mod is not None,
                has_mask_mod=problem.mask_mod is not None,
                part_out=part_out,
                part_lse=part_lse,
                out=out,
                lse=lse,
            ),
            problem.mod_args,
        )
    out = out.reshape(problem.out_shape)
    lse = lse.reshape(problem.lse_shape)
    if problem.dtype != compute:
        out, lse = out.astype(problem.dtype), lse.astype(problem.dtype)
    return out, lse
