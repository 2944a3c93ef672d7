"""The ``cuda`` backend's ``decode``: a validated ``DecodeProblem`` on the split-KV kernels of
``engine.kernels.cuda.decode``.

Host (NumPy) caches: the new keys and values are written **on the host**, in place, by the same
code as the ``cpu`` backend (``engine.backends.kvcache.write_new_entries``: NumPy's rounding to the cache
dtype, so the caches end up bit-identical to the ``cpu`` backend's). Then both whole caches, the
query (as float32), the page table and the lengths are copied to the GPU on a private stream,
the kernels run, and ``out``/``lse`` are copied back and the stream synchronised. The copy of the
caches costs ``2 x num_pages x Hkv x page_size x D x itemsize`` bytes over PCIe on every call
(a 4 GiB cache is about 0.1 s at 50 GB/s, against about 1 ms to read it on the GPU): host caches
are for testing and small caches; a decoding loop keeps its caches on the GPU.

Device caches (torch CUDA tensors, CuPy arrays, Numba device arrays): the new entries are
written **in place on the device** by ``_write_entries`` on the caller's stream (torch's current
stream, CuPy's, the Numba array's), then the split-KV and merge kernels run on that stream, and
``out``/``lse`` are allocated by the caller's library; nothing synchronises. ``cache_seqlens`` and
``page_table`` are host arrays (validation reads them) and are copied to the device
asynchronously. The query is read in place (any strides). This path has never run: no GPU was
available; it is compiled to PTX only.

Importing this module needs neither CUDA nor numba-cuda; ``run_decode`` imports the kernels.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ...problems.arrays import array_dtype, is_bfloat16
from ...problems.decode import DecodeProblem
from ...runtime.config import (
    CUDA_DECODE_BLOCK_ROWS,
    CUDA_DECODE_DEFAULT_SMS,
    CUDA_DECODE_SHARED_BYTES,
    CUDA_DECODE_THREADS,
)
from ..base import Op
from ..kvcache import new_entries_written, pick_num_splits

__all__ = [
    "CudaDecode",
    "run_decode",
    "decode_tiles",
    "decode_shared_bytes",
    "sm_count",
    "choose_num_splits",
    "cuda_decode_reasons",
]


class CudaDecode(Op):
    """Split-KV decoding on the GPU (FlashAttention's split-KV / Flash-Decoding): float32
    arithmetic; float64 is refused (consumer GPUs run it at 1/32 to 1/64 of float32)."""

    problem_type = DecodeProblem
    dtypes = ("float16", "float32", "bfloat16")
    cache_dtypes = ("float16", "float32", "bfloat16")
    device_arrays = True
    supports_mods = True

    def not_supported_reasons(self, problem: DecodeProblem) -> list[str]:
        return super().not_supported_reasons(problem) + cuda_decode_reasons(problem)

    def run(self, problem: DecodeProblem):
        return run_decode(problem)


#: static shared memory per block is limited to 48 KiB
_SHARED_LIMIT = 48 * 1024
#: threads of the merge kernel's blocks
_MERGE_THREADS = 128


def decode_shared_bytes(E: int, Ev: int, block_rows: int, block_k: int) -> int:
    """Bytes of static shared memory one block of the split-KV kernel uses: the scaled query rows,
    a key tile (rows padded by one float against bank conflicts), a value tile, the scores and
    the accumulators (float32), each row's max, sum, rescale factor (float32) and visible key
    range (int64), and each tile row's page and slot (int64)."""
    floats = block_rows * E + block_k * (E + 1) + block_k * Ev + block_rows * block_k + block_rows * Ev
    return 4 * (floats + 3 * block_rows) + 8 * 2 * (block_rows + block_k)


def decode_tiles(E: int, Ev: int, rows: int, block_rows: int | None = None, block_k: int | None = None):
    """``(block_rows, block_k)`` for head sizes E, Ev and ``rows = group x L`` query rows per cache
    head: up to ``CUDA_DECODE_BLOCK_ROWS`` rows (a power of two covering ``rows`` when fewer), and
    key tiles of the most keys (a multiple of 8, 8 to 64) that fit ``CUDA_DECODE_SHARED_BYTES``.
    Explicit values (tests use tiny tiles) are taken as they are."""
    if block_rows is None:
        block_rows = min(CUDA_DECODE_BLOCK_ROWS, 1 << max(0, rows - 1).bit_length())
    if block_k is None:
        block_k = 64
        while block_k > 8 and decode_shared_bytes(E, Ev, block_rows, block_k) > CUDA_DECODE_SHARED_BYTES:
            block_k -= 8
    return block_rows, block_k


def cuda_decode_reasons(problem: DecodeProblem) -> list[str]:
    """What the ``cuda`` decode cannot run beyond dtypes and availability: head sizes whose tiles
    do not fit in shared memory even at the smallest key tile; new entries of a dtype the device
    write does not convert (float64 would be rounded twice on its way to a 16-bit cache)."""
    reasons = []
    rb, bk = decode_tiles(problem.E, problem.Ev, problem.group * problem.L)
    need = decode_shared_bytes(problem.E, problem.Ev, rb, bk)
    if need > _SHARED_LIMIT:
        reasons.append(
            f"head sizes D = {problem.E}, Dv = {problem.Ev} need {need} bytes of shared memory per "
            f"block for decoding (at most {_SHARED_LIMIT})"
        )
    if problem.on_device and problem.key is not None:
        for name in ("key", "value"):
            dt = array_dtype(getattr(problem, name))
            if dt.itemsize not in (2, 4):
                reasons.append(f"{name} of dtype {dt} on the device (written from float32, float16 or bfloat16)")
    return reasons


def sm_count() -> int:
    """The current GPU's streaming multiprocessors; ``CUDA_DECODE_DEFAULT_SMS`` (132, an H100/H200
    SXM) when no GPU can be asked (the CUDA simulator)."""
    from numba import config, cuda

    if config.ENABLE_CUDASIM or not cuda.is_available():
        return CUDA_DECODE_DEFAULT_SMS
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def choose_num_splits(blocks: int, max_keys: int, sms: int) -> int:
    """``num_splits=None``: FlashAttention's heuristic (``num_splits_heuristic`` in its
    ``flash_api.cpp``) with two resident blocks per multiprocessor as the slots to fill, as
    FlashAttention passes ``2 x multiProcessorCount``: no split when ``blocks`` (sequences x cache
    heads x row blocks) fill them, else the smallest split whose wave efficiency is within 85% of
    the best, each split at least ``DECODE_MIN_SPLIT_KEYS`` keys (the ``cpu`` backend's
    :func:`~engine.backends.kvcache.pick_num_splits`)."""
    return pick_num_splits(blocks, max_keys, 2 * sms)


def _cache_kind(dtype: np.dtype) -> int:
    from ...kernels.cuda.decode import CACHE_BFLOAT16, CACHE_FLOAT16, CACHE_FLOAT32

    if is_bfloat16(dtype):
        return CACHE_BFLOAT16
    return CACHE_FLOAT16 if dtype == np.float16 else CACHE_FLOAT32


def run_decode(
    problem: DecodeProblem,
    *,
    threads: int | None = None,
    block_rows: int | None = None,
    block_k: int | None = None,
    sms: int | None = None,
):
    """Write the new entries, then attend on the GPU; ``(out, lse)`` in the query's dtype: NumPy
    arrays for host caches, arrays of the caller's library on its device for device caches.
    ``threads``/``block_rows``/``block_k`` override the tile sizes (the simulator tests use tiny
    ones), ``sms`` the multiprocessor count ``num_splits=None`` plans for."""
    from numba import cuda

    from ...kernels.cuda import decode as kd
    from .operands import DeviceArrays, HostArrays

    B, Hq, L, E, Ev = problem.batch, problem.num_q_heads, problem.L, problem.E, problem.Ev
    Hkv, group = problem.num_kv_heads, problem.group
    rows = group * L
    rb, bk = decode_tiles(E, Ev, rows, block_rows, block_k)
    nt = int(threads or CUDA_DECODE_THREADS)
    nrb = math.ceil(rows / rb)
    seqlens_k = np.ascontiguousarray(problem.seqlens_k, dtype=np.int64)
    splits = problem.num_splits
    if splits is None:
        splits = choose_num_splits(B * Hkv * nrb, int(seqlens_k.max()), sms or sm_count())
    splits = min(splits, max(1, int(seqlens_k.max())))  # a split with no key does nothing
    kind = _cache_kind(problem.cache_dtype)
    N = B * Hq * L
    if problem.page_table is None:  # a contiguous cache: one page per sequence
        table = np.arange(B, dtype=np.int32).reshape(B, 1)
    else:
        table = np.ascontiguousarray(problem.page_table, dtype=np.int32)

    if problem.on_device:
        arrays = DeviceArrays(cuda, problem.query)
        written = contextlib.nullcontext()  # device caches: written below, by the write kernel
    else:
        arrays = HostArrays(cuda)
        written = new_entries_written(problem)  # undone if anything below raises
    with written, arrays.context():
        stream = arrays.stream
        d_table = cuda.to_device(table, stream=stream)
        if problem.on_device:
            d_k, d_v = arrays.as_numba(problem.k_cache), arrays.as_numba(problem.v_cache)
            d_q = arrays.as_numba(problem.query)
            q_kind = _cache_kind(problem.dtype)
            if problem.key is not None and problem.L_new:
                d_old = cuda.to_device(np.ascontiguousarray(problem.cache_seqlens, dtype=np.int64), stream=stream)
                d_key, d_value = arrays.as_numba(problem.key), arrays.as_numba(problem.value)
                write = kd.write_kernel(kind, *(_cache_kind(array_dtype(a)) for a in (problem.key, problem.value)))
                n = max(int(d_key.size), int(d_value.size))
                write[(math.ceil(n / _MERGE_THREADS),), _MERGE_THREADS, stream](
                    d_key, d_value, d_k, d_v, d_table, d_old
                )
        else:
            k_pages, v_pages = problem.k_cache, problem.v_cache
            if kind == kd.CACHE_BFLOAT16:
                k_pages, v_pages = k_pages.view(np.uint16), v_pages.view(np.uint16)
            d_k = cuda.to_device(k_pages, stream=stream)
            d_v = cuda.to_device(v_pages, stream=stream)
            q = np.ascontiguousarray(np.asarray(problem.query).astype(np.float32, copy=False))
            d_q = cuda.to_device(q, stream=stream)
            q_kind = kd.CACHE_FLOAT32
        d_seqlens = cuda.to_device(seqlens_k, stream=stream)
        part_out = cuda.device_array((splits, N, Ev), dtype=np.float32, stream=stream)
        part_lse = cuda.device_array((splits, N), dtype=np.float32, stream=stream)
        mod_args = tuple(arrays.mod_arg(a) for a in problem.mod_args)
        left, right = problem.window

        kern = kd.decode_kernel(E, Ev, rb, bk, nt, kind, problem.score_mod, problem.mask_mod, q_kind)
        kern[(nrb * splits, Hkv, B), nt, stream](
            d_q,
            d_k,
            d_v,
            d_table,
            d_seqlens,
            group,
            splits,
            problem.is_causal,
            left,
            right,
            problem.scale,
            mod_args,
            part_out,
            part_lse,
        )
        merge = kd.merge_kernel(q_kind if problem.on_device else kd.CACHE_FLOAT32)
        grid = (math.ceil(N * Ev / _MERGE_THREADS),)
        if problem.on_device:  # the result in the caller's library and dtype, on its stream
            out = arrays.empty(problem.out_shape, problem.dtype)
            lse = arrays.empty(problem.lse_shape, problem.dtype)
            d_out = arrays.as_numba(out).reshape(N, Ev)
            d_lse = arrays.as_numba(lse).reshape(N)
            merge[grid, _MERGE_THREADS, stream](part_out, part_lse, d_out, d_lse)
            return out, lse
        d_out = cuda.device_array((N, Ev), dtype=np.float32, stream=stream)
        d_lse = cuda.device_array(N, dtype=np.float32, stream=stream)
        merge[grid, _MERGE_THREADS, stream](part_out, part_lse, d_out, d_lse)
        o = d_out.copy_to_host(stream=stream)
        s = d_lse.copy_to_host(stream=stream)
        stream.synchronize()
    o = o.reshape(problem.out_shape)
    s = s.reshape(problem.lse_shape)
    if problem.dtype != np.float32:  # float16/bfloat16 queries: one rounding (nearest even)
        o, s = o.astype(problem.dtype), s.astype(problem.dtype)
    return o, s
