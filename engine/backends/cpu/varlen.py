"""The ``cpu`` backend's varlen ops, and the packed-query path of its decode op.

A packed batch (``engine.varlen_attention``) runs the dense forward's tile arithmetic over its
sequences (``engine.kernels.cpu.varlen_flash``: the tiles, GEMM provider and generated tile
kernels of ``engine.backends.cpu.tiles``, measured per machine where tuning is on), except in
three cases that take the ragged kernel (``engine.kernels.cpu.varlen_fwd``): decode-like batches
(every sequence's rows of a GQA group at most ``DECODE_FUSED_ROWS``: the keys are read in place,
``(total_k, H, 1, E)``, one key per page, and the products computed row by row), batches whose
ragged kernel would split the keys across threads (fewer tasks than threads, long keys), and
``E = 0``. The packed decode op's queries always take the ragged kernel, on the cache's pages.
The backward op is in ``varlen_backward``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ...kernels.cpu.gemm import GEMM_CBLAS, GEMM_NUMPY
from ...kernels.cpu.half_floats import BFLOAT16_BITS, FLOAT16_BITS
from ...problems.decode import DecodeProblem
from ...problems.varlen import VarlenProblem
from ...runtime.config import (
    CPU_QUIET_OPENMP_MIN_WORK,
    CPU_SERIAL_MAX_WORK,
    CPU_TUNE_MAX_WIDTH,
    CPU_TUNE_MIN_WORK,
    DECODE_BLOCK_K,
    DECODE_BLOCK_ROWS,
    DECODE_FUSED_ROWS,
)
from ...runtime.entry_points import canonical_entry
from ...runtime.gemm_jit import NO_JIT, tile_jit_kernels
from ...runtime.gemm_providers import gemm_mode, get_gemm_provider
from ...runtime.threads import get_num_threads, kernel_call_guard, quiet_openmp
from ...runtime.tuning import autotune_enabled
from ..base import Op
from ..kvcache import pick_num_splits
from .autotune import tune_provider, tune_tiles
from .blas_pin import get_blas_pin
from .forward import CpuForward
from .tiles import diagonal_strip, forward_tiles, tile_class, varlen_sub_tiles

__all__ = ["CpuVarlen", "attend_packed", "attend_packed_arrays"]

_NO_PIN = contextlib.nullcontext()
_kernel_module = None


def _kernels():
    """The kernel module, imported on first use (``import engine`` compiles nothing)."""
    global _kernel_module
    if _kernel_module is None:
        from ...kernels.cpu import varlen_fwd

        _kernel_module = varlen_fwd
    return _kernel_module


def _half_kind(dtype: np.dtype) -> int:
    if dtype.itemsize != 2:
        return 0
    return FLOAT16_BITS if dtype == np.float16 else BFLOAT16_BITS


def _bits(a: np.ndarray) -> np.ndarray:
    """Pages of 16-bit floats as their uint16 bits (no copy); others as they are."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


class CpuVarlen(Op):
    problem_type = VarlenProblem
    dtypes = ("float16", "float32", "float64", "bfloat16")
    supports_mods = True

    def run(self, problem: VarlenProblem):
        compute = np.dtype(np.float64 if problem.dtype == np.float64 else np.float32)
        B, H, E, Ev = problem.batch, problem.num_kv_heads, problem.E, problem.Ev
        ck = problem.cu_seqlens_k
        fused = problem.group * problem.max_seqlen_q <= DECODE_FUSED_ROWS
        if not fused and E > 0 and not _wants_split_kv(problem):  # the dense forward's tiles (varlen_flash)
            out, lse = self._run_tiled(problem, compute)
            return out.astype(problem.dtype, copy=False), lse.astype(problem.dtype, copy=False)
        k, v = np.ascontiguousarray(problem.key), np.ascontiguousarray(problem.value)
        if fused:  # every task reads rows in place
            k_pages, v_pages = k.reshape(-1, H, 1, E), v.reshape(-1, H, 1, Ev)
            table = (ck[:-1, None] + np.arange(problem.max_seqlen_k)[None, :]).astype(np.int32)
            k_base = np.zeros(B, dtype=np.int64)
        else:  # E = 0 (BLAS takes no empty inner dimension): one head-major page, the ragged kernel
            k_pages, v_pages = _head_major(k), _head_major(v)
            table = np.zeros((B, 1), dtype=np.int32)
            k_base = ck[:-1].copy()
        out, lse = attend_packed_arrays(
            problem,
            q=np.ascontiguousarray(problem.query, dtype=compute),
            k_pages=_bits(k_pages),
            v_pages=_bits(v_pages),
            page_table=table,
            k_base=k_base,
            seqlens_k=np.diff(ck),
            q_start=problem.cu_seqlens_q,
            half_kind=_half_kind(problem.dtype),
            gather=bool(problem.dtype.itemsize == 2 or k_pages.shape[2] == 1),
            window=problem.window,
            num_splits=None,
        )
        return out.astype(problem.dtype, copy=False), lse.astype(problem.dtype, copy=False)

    def _run_tiled(self, problem: VarlenProblem, compute: np.dtype):
        """``(out, lse)`` in the compute dtype through the packed-batch flash kernel, with the
        dense forward's tiles, GEMM provider and generated tile kernels (measured first where
        tuning asks for it, as the dense forward does: ``engine.backends.cpu.autotune``)."""
        from ...kernels.cpu import varlen_flash

        q_lens, k_lens = np.diff(problem.cu_seqlens_q), np.diff(problem.cu_seqlens_k)
        Hq, E, Ev = problem.num_q_heads, problem.E, problem.Ev
        work = int(np.dot(q_lens, k_lens)) * Hq * (E + Ev)
        threads = get_num_threads()
        provider, pin, plan, jit = tiled_setup(problem, compute, threads, CpuForward(self.backend).run, work)
        name = compute.name
        q, k, v = (np.ascontiguousarray(a, dtype=compute) for a in (problem.query, problem.key, problem.value))
        total = problem.query.shape[0]
        out = np.empty((total, Hq, Ev), dtype=compute)
        lse = np.empty((total, Hq), dtype=compute)
        left, right = problem.window
        args = varlen_flash.VarlenFlashArgs(
            q=q,
            k=k,
            v=v,
            cu_q=np.ascontiguousarray(problem.cu_seqlens_q, dtype=np.int64),
            cu_k=np.ascontiguousarray(problem.cu_seqlens_k, dtype=np.int64),
            causal=problem.is_causal,
            left=left,
            right=right,
            scale=problem.scale,
            group=problem.group,
            block_q=plan.block_q,
            block_k=plan.block_k,
            sub_tiles=varlen_sub_tiles(plan, q_lens, Hq, threads, max(E, Ev)),
            strip=diagonal_strip(plan.block_q),
            has_score_mod=problem.score_mod is not None,
            has_mask_mod=problem.mask_mod is not None,
            threads=threads,
            gemm_kind=provider.kind,
            gemm_fn=provider.pointer(name),
            jit_scores=jit[0],
            jit_scores_h=jit[1],
            jit_values=jit[2],
            jit_values_h=jit[3],
            out=out,
            lse=lse,
        )
        serial = work <= CPU_SERIAL_MAX_WORK
        kernel = varlen_flash.varlen_flash_kernel(problem.score_mod, problem.mask_mod, serial)
        with kernel_call_guard(), _NO_PIN if pin is None else pin():
            if not serial and work >= CPU_QUIET_OPENMP_MIN_WORK:
                quiet_openmp()  # torch's idle workers would spin on our cores (runtime.threads)
            # the entry compiled for q, k, v typed read-only (as the dense forward's, whose tile
            # overloads it shares): no typing of every argument per call (~80 us a call)
            (canonical_entry(kernel, (args, problem.mod_args)) or kernel)(args, problem.mod_args)
        return out, lse


def tiled_setup(problem, compute: np.dtype, threads: int, tune=None, work: int = 0):
    """``(provider, pin, plan, jit)`` of a packed batch's tiled forward (``varlen_flash``): the
    GEMM provider of ``compute``, the BLAS pin it needs (None), the dense forward's tiles for the
    longest query sequence (``tiles.forward_tiles``) and their generated kernels. ``tune``: the
    dense forward op's ``run``, with which a call of ``work`` multiply-adds measures the provider
    and the class's tiles first where tuning asks for it, as the dense forward does. The varlen
    backward calls it without ``tune`` for the same tiles (what tuning stored since is read)."""
    name = compute.name
    E, Ev = problem.E, problem.Ev
    big = tune is not None and work >= CPU_TUNE_MIN_WORK and autotune_enabled()
    if big and gemm_mode() == "auto" and max(E, Ev) <= CPU_TUNE_MAX_WIDTH:
        tune_provider(tune, name, max(E, Ev))
    provider = get_gemm_provider(name, max(E, Ev))
    pin = get_blas_pin() if provider.kind == GEMM_NUMPY else None
    pinned = pin is None or pin.available
    L = max(1, problem.max_seqlen_q)
    cls = tile_class(L, E, Ev)
    if big and pinned and cls is not None:
        tune_tiles(tune, provider, compute, *cls)
    plan = forward_tiles(L, E, Ev, name, provider.name, pinned, problem.batch * problem.num_q_heads, threads)
    jit = NO_JIT
    if provider.kind == GEMM_CBLAS:
        jit = tile_jit_kernels(provider, name, plan.block_q, plan.block_k, E, Ev)
    return provider, pin, plan, jit


def _wants_split_kv(problem: VarlenProblem) -> bool:
    """Whether the ragged kernel would split the keys across threads (fewer tasks than threads
    and long keys: a few query rows against a long prefix), which the tiled kernel does not."""
    q_lens = np.diff(problem.cu_seqlens_q)
    tasks = int(np.sum(-(-problem.group * q_lens // DECODE_BLOCK_ROWS))) * problem.num_kv_heads
    threads = get_num_threads()
    return tasks < threads and pick_num_splits(tasks, problem.max_seqlen_k, threads) > 1


def _head_major(a: np.ndarray) -> np.ndarray:
    """Packed (total, H, D) as one head-major page (1, H, total, D), copied in parallel."""
    out = np.empty((a.shape[1], a.shape[0], a.shape[2]), dtype=a.dtype)
    if out.size:
        with kernel_call_guard():
            _kernels().head_major(_bits(a), _bits(out))
    return out.reshape((1,) + out.shape)


def attend_packed(problem: DecodeProblem):
    """``(out, lse)`` of a decode problem with packed queries (``cu_seqlens_q``), its new entries
    already written: the caches are the pages, read in place."""
    compute = problem.compute_dtype
    if problem.page_table is None:
        table = np.arange(problem.batch, dtype=np.int32).reshape(problem.batch, 1)
    else:
        table = np.ascontiguousarray(problem.page_table, dtype=np.int32)
    out, lse = attend_packed_arrays(
        problem,
        q=np.ascontiguousarray(problem.query, dtype=compute),
        k_pages=_bits(problem.k_cache),
        v_pages=_bits(problem.v_cache),
        page_table=table,
        k_base=np.zeros(problem.batch, dtype=np.int64),
        seqlens_k=problem.seqlens_k,
        q_start=problem.cu_seqlens_q,
        half_kind=_half_kind(problem.cache_dtype),
        gather=bool(problem.cache_dtype.itemsize == 2 or problem.page_table is not None),
        window=problem.window,
        num_splits=problem.num_splits,
    )
    return out.astype(problem.dtype, copy=False), lse.astype(problem.dtype, copy=False)


def attend_packed_arrays(
    problem, *, q, k_pages, v_pages, page_table, k_base, seqlens_k, q_start, half_kind, gather, window, num_splits
):
    """Run the ragged kernel on laid-out arrays; ``(out, lse)`` packed, ``(total, Hq, Ev)`` and
    ``(total, Hq)``, in the compute dtype (q's)."""
    total, Hq = q.shape[0], q.shape[1]
    Ev = v_pages.shape[3]
    group = problem.group
    q_lens = np.diff(q_start)
    tasks = int(np.sum(-(-group * q_lens // DECODE_BLOCK_ROWS))) * problem.num_kv_heads
    max_keys = int(seqlens_k.max()) if len(seqlens_k) else 0
    threads = get_num_threads()
    splits = num_splits
    if splits is None:
        splits = 1 if tasks >= threads else pick_num_splits(tasks, max_keys, threads)
    splits = max(1, min(splits, max_keys))  # a split with no key does nothing
    N = total * Hq
    out = np.empty((N, Ev), dtype=q.dtype)
    lse = np.empty(N, dtype=q.dtype)
    if splits > 1:
        part_out = np.empty((splits, N, Ev), dtype=q.dtype)
        part_lse = np.empty((splits, N), dtype=q.dtype)
    else:
        part_out, part_lse = out.reshape(1, N, Ev), lse.reshape(1, N)
    provider = get_gemm_provider(q.dtype.name, max(problem.E, Ev))
    gemm_kind, gemm_fn = provider.kind, provider.pointer(q.dtype.name)
    # keys read: tiny calls run serially (the thread pool's wake-up costs more than it gains)
    work = int(np.dot(q_lens, seqlens_k)) * Hq * (problem.E + Ev)
    serial = splits == 1 and work <= CPU_SERIAL_MAX_WORK
    kernel = _kernels().varlen_kernel(problem.score_mod, problem.mask_mod, serial)
    # only np.dot's OpenBLAS starts threads of its own, and only tasks over fused_rows call it
    small = gemm_kind != GEMM_NUMPY or group * (int(q_lens.max()) if len(q_lens) else 0) <= DECODE_FUSED_ROWS
    left, right = window
    args = _kernels().VarlenArgs(
        q=q,
        q_start=np.ascontiguousarray(q_start, dtype=np.int64),
        k_pages=k_pages,
        v_pages=v_pages,
        page_table=page_table,
        k_base=np.ascontiguousarray(k_base, dtype=np.int64),
        seqlens_k=np.ascontiguousarray(seqlens_k, dtype=np.int64),
        causal=problem.is_causal,
        left=left,
        right=right,
        scale=problem.scale,
        group=group,
        half_kind=half_kind,
        gather=gather,
        splits=splits,
        block_k=DECODE_BLOCK_K,
        block_rows=DECODE_BLOCK_ROWS,
        fused_rows=DECODE_FUSED_ROWS,
        has_score_mod=problem.score_mod is not None,
        has_mask_mod=problem.mask_mod is not None,
        threads=threads,
        gemm_kind=gemm_kind,
        gemm_fn=gemm_fn,
        part_out=part_out,
        part_lse=part_lse,
        out=out,
        lse=lse,
    )
    with kernel_call_guard(), _NO_PIN if small else get_blas_pin()():
        (canonical_entry(kernel, (args, problem.mod_args)) or kernel)(args, problem.mod_args)
    return out.reshape(total, Hq, Ev), lse.reshape(total, Hq)
