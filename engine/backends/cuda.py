"""The ``cuda`` backend (numba-cuda). Importing this module never needs CUDA, a GPU or numba-cuda.

Arrays:

* NumPy (host) inputs are made C-contiguous, copied to the device on a fresh stream, and the
  result is copied back: the caller gets NumPy arrays, as from the ``cpu`` backend.
* bfloat16 (ml_dtypes' NumPy dtype, torch ``bfloat16`` tensors) reaches the kernel as ``uint16``
  views of the same memory; the kernel converts (``engine.kernels.bfloat16``).
* Device inputs (anything with ``__cuda_array_interface__``) are read **in place**, whatever their
  strides (a transposed torch tensor, a broadcast mask): the kernel indexes a flat view of the
  caller's memory through element strides (see ``engine.kernels.cuda_flash_fwd``). The result is
  allocated by the caller's library and stays on the device: torch CUDA tensors give torch
  tensors, CuPy arrays give CuPy arrays, Numba device arrays (and any other producer of the
  interface) give Numba device arrays.
* Stream: torch inputs run on ``torch.cuda.current_stream()``, CuPy inputs on CuPy's current
  stream, Numba device arrays on the stream they are bound to (``arr.stream``, else the default
  stream). The call does not synchronise for device inputs, so the result is ordered after
  earlier work on that stream and before later work, exactly as the library's own operations.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading

import numpy as np

from ..config import CUDA_BLOCK_Q, CUDA_MAX_HEAD_SUM, CUDA_TILE_SHARED_BYTES
from ..kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE, TILE_FULL
from ..validation import AttentionProblem, is_bfloat16
from .base import Backend

__all__ = ["CudaBackend", "tile_sizes", "flat_layout"]


def tile_sizes(E: int, Ev: int) -> tuple[int, int]:
    """(block_q, block_k) for head sizes E and Ev: 128 query rows per block, and key tiles as long
    as fit 32 KiB of shared memory (64 rows for E = Ev = 64, 32 for E = Ev = 128), a multiple of 8."""
    width = max(E, 1) + max(Ev, 1)
    block_k = max(8, min(64, CUDA_TILE_SHARED_BYTES // (4 * width) // 8 * 8))
    return CUDA_BLOCK_Q, block_k


def flat_layout(shape, strides, itemsize: int, batch_shape: tuple, rank: int):
    """How the kernel indexes one operand in place.

    ``shape``/``strides`` (bytes; ``None`` for C order) describe the caller's array, which is
    broadcastable to ``batch_shape + (heads, rows, cols)`` (``rank`` = len of that). Returns
    ``(lo, span, offsets, axis_strides)``: the flat view starts ``lo`` elements from the array's
    first element and holds ``span`` elements; ``offsets[b]`` (int64, one per flattened batch
    entry) is where batch entry ``b`` starts in the view, ``axis_strides`` the element strides of
    the last three axes. Size-1 axes get stride 0, which broadcasts them. ``ValueError`` if a
    stride is not a multiple of the item size.
    """
    shape = tuple(int(n) for n in shape)
    if strides is None:
        strides, acc = [], itemsize
        for n in reversed(shape):
            strides.insert(0, acc)
            acc *= max(n, 1)
    el = []
    for n, st in zip(shape, strides):
        if st % itemsize:
            raise ValueError(
                f"array of shape {shape} has stride {st} bytes, not a multiple of its item size {itemsize}"
            )
        el.append(0 if n == 1 else st // itemsize)
    pad = rank - len(shape)
    shape = (1,) * pad + shape
    el = [0] * pad + el
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, el))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, el))
    nb = len(batch_shape)
    offsets = np.zeros(batch_shape, dtype=np.int64) - lo
    for ax in range(nb):
        idx = np.arange(batch_shape[ax], dtype=np.int64) * el[ax]
        offsets = offsets + idx.reshape((-1,) + (1,) * (nb - ax - 1))
    return lo, hi - lo + 1, offsets.reshape(-1), tuple(el[nb:])


class _HostArrays:
    """NumPy in, NumPy out: copies on a private stream, synchronised before returning."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.stream = cuda.stream()

    def context(self):
        return contextlib.nullcontext()

    def flat(self, arr, problem, rank, cast=None):
        a = np.ascontiguousarray(arr if cast is None else arr.astype(cast, copy=False))
        if is_bfloat16(a.dtype):
            a = a.view(np.uint16)
        if a.size == 0:  # E = 0 or S = 0: never read, but the kernel needs an array
            return _dummy(self.cuda, a.dtype, problem, self.stream)
        lo, span, offs, st = flat_layout(a.shape, a.strides, a.itemsize, problem.batch_shape, rank)
        return self.cuda.to_device(a.reshape(-1), stream=self.stream), offs, st

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype=_bits_dtype(dtype), stream=self.stream)

    def as_numba(self, arr):
        return arr

    def mod_arg(self, value):
        """A mod argument as the kernel takes it: arrays copied to the device, scalars as they are."""
        if isinstance(value, np.ndarray):
            return self.cuda.to_device(np.ascontiguousarray(value), stream=self.stream)
        return value

    def finish(self, out, lse, problem):
        o = out.copy_to_host(stream=self.stream)
        s = lse.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        if is_bfloat16(problem.dtype):
            o, s = o.view(problem.dtype), s.view(problem.dtype)
        return o.reshape(problem.out_shape), s.reshape(problem.lse_shape)

    def empty_result(self, problem):
        from .base import empty_result

        return empty_result(problem)


class _DeviceArrays:
    """Device arrays in place; the result is allocated by the caller's library."""

    def __init__(self, cuda, like):
        self.cuda = cuda
        mod = type(like).__module__.split(".")[0]
        self.kind = mod if mod in ("torch", "cupy") else "numba"
        if self.kind == "torch":
            import torch

            self.lib = torch
            self.device = like.device
            ptr = torch.cuda.current_stream(like.device).cuda_stream
            self.device_index = like.device.index
        elif self.kind == "cupy":
            import cupy

            self.lib = cupy
            self.device = like.device
            ptr = cupy.cuda.get_current_stream().ptr
            self.device_index = like.device.id
        else:
            self.lib = None
            self.device_index = None
            ptr = None
        self._stream_ptr = ptr
        self._numba_stream = getattr(like, "stream", 0) if self.kind == "numba" else 0
        self.stream = None

    def context(self):
        """Makes the inputs' GPU current for Numba (and CuPy) while the call runs."""
        stack = contextlib.ExitStack()
        if self.device_index is not None:
            stack.enter_context(self.cuda.gpus[self.device_index])
            if self.kind == "cupy":
                stack.enter_context(self.device)
        # streams belong to a context: make them once the inputs' GPU is current
        if self.kind == "numba":
            self.stream = self._numba_stream or self.cuda.default_stream()
        elif self._stream_ptr:
            self.stream = self.cuda.external_stream(self._stream_ptr)
        else:  # torch/CuPy on the legacy default stream
            self.stream = self.cuda.default_stream()
        return stack

    def flat(self, arr, problem, rank, cast=None):
        cai = arr.__cuda_array_interface__
        # validation let a 2-byte void through only for torch bfloat16: read its bits as uint16
        typestr = "<u2" if cai["typestr"] == "<V2" else cai["typestr"]
        dtype = np.dtype(typestr)
        if math.prod(cai["shape"]) == 0:
            return _dummy(self.cuda, dtype, problem, self.stream)
        lo, span, offs, st = flat_layout(cai["shape"], cai.get("strides"), dtype.itemsize, problem.batch_shape, rank)
        desc = {
            "shape": (span,),
            "strides": None,
            "typestr": typestr,
            "data": (cai["data"][0] + lo * dtype.itemsize, False),
            "version": 3,
        }
        # no stream sync: the kernel runs on the stream that produced the array
        return self.cuda.from_cuda_array_interface(desc, owner=arr, sync=False), offs, st

    def empty(self, shape, dtype):
        if self.kind == "torch":
            return self.lib.empty(shape, dtype=_torch_dtype(self.lib, dtype), device=self.device)
        if self.kind == "cupy":
            return self.lib.empty(shape, dtype=dtype)
        return self.cuda.device_array(shape, dtype=_bits_dtype(dtype), stream=self.stream)

    def as_numba(self, arr):
        if self.kind == "numba":
            return arr
        if self.kind == "torch" and arr.dtype == self.lib.bfloat16:
            arr = arr.view(self.lib.uint16)  # same memory; torch exports bfloat16 as an untyped <V2
        return self.cuda.as_cuda_array(arr, sync=False)

    def mod_arg(self, value):
        """Device arrays among the mods' arguments are used in place, host arrays copied over."""
        if hasattr(value, "__cuda_array_interface__"):
            return self.cuda.as_cuda_array(value, sync=False)
        if isinstance(value, np.ndarray):
            return self.cuda.to_device(np.ascontiguousarray(value), stream=self.stream)
        return value

    def finish(self, out, lse, problem):
        return out.reshape(problem.out_shape), lse.reshape(problem.lse_shape)

    def empty_result(self, problem):
        from .base import empty_result

        o, s = empty_result(problem)
        if self.kind == "torch":
            dt = _torch_dtype(self.lib, problem.dtype)
            # via float32: torch.from_numpy knows no ml_dtypes bfloat16 (zeros and -inf are exact)
            return tuple(self.lib.from_numpy(a.astype(np.float32)).to(self.device, dt) for a in (o, s))
        if self.kind == "cupy":
            return self.lib.asarray(o), self.lib.asarray(s)
        return self.cuda.to_device(o, stream=self.stream), self.cuda.to_device(s, stream=self.stream)


def qkv_mask_operands(problem: AttentionProblem, cuda, arrays):
    """The flat layouts of query, key, value and the mask (a dummy without one), as the forward
    and backward kernels take them, and the mask kind. A host float mask is cast to the storage
    dtype; a device one is read as it is."""
    rank = len(problem.batch_shape) + 3
    ops = [arrays.flat(a, problem, rank) for a in (problem.query, problem.key, problem.value)]
    kind = MASK_NONE
    if problem.attn_mask is not None:
        kind = MASK_BOOL if problem.mask_kind == "bool" else MASK_FLOAT
        cast = problem.dtype if kind == MASK_FLOAT and not problem.on_device else None
        ops.append(arrays.flat(problem.attn_mask, problem, rank, cast=cast))
    else:
        ops.append(_dummy(cuda, np.bool_, problem, arrays.stream))
    return ops, kind


def _tile_kinds(problem: AttentionProblem, block_q: int, block_k: int) -> np.ndarray:
    """The mask_mod's block map at the kernel's tiles, computed on the host (by the cpu
    classifier; device arrays among ``mod_args`` are copied to the host for it): from the
    caller's block mask when there is one (memoised there), else built for this call."""
    from ..mods import create_block_mask

    bm = problem.block_mask
    if bm is None:
        args = tuple(_host_copy(a) for a in problem.mod_args)
        bm = create_block_mask(
            problem.mask_mod,
            problem.batch,
            problem.num_q_heads,
            problem.L,
            problem.S,
            mod_args=args,
            block_q=block_q,
            block_k=block_k,
        )
    return bm.kinds_at(block_q, block_k)


def _host_copy(value):
    if hasattr(value, "__cuda_array_interface__"):
        from numba import cuda

        return cuda.as_cuda_array(value).copy_to_host()
    return value


def _dummy(cuda, dtype, problem, stream):
    """A one-element stand-in for an operand the kernel never reads (no mask, or size 0)."""
    return (cuda.to_device(np.zeros(1, dtype=dtype), stream=stream), np.zeros(problem.batch, dtype=np.int64), (0, 0, 0))


def _torch_dtype(torch, dtype):
    if is_bfloat16(np.dtype(dtype)):
        return torch.bfloat16
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


def _bits_dtype(dtype):
    """The dtype the kernel stores: bfloat16 as its uint16 bit patterns, others as they are."""
    return np.dtype(np.uint16) if is_bfloat16(np.dtype(dtype)) else np.dtype(dtype)


class CudaBackend(Backend):
    """The tiled flash kernel on an NVIDIA GPU; see the module docstring for array handling.

    ``block_q``/``block_k`` override the tile sizes of :func:`tile_sizes` (tests use small ones).
    """

    name = "cuda"
    description = "numba-cuda tiled flash kernel (one block per query tile, K/V tiles in shared memory)"
    dtypes = ("float16", "float32", "bfloat16")
    host_arrays = True
    device_arrays = True
    supports_mods = True
    #: the backward is ``engine.kernels.cuda_flash_bwd`` (host side in ``cuda_backward``)
    supports_backward = True
    supports_dropout = True
    # below ``cpu``: for host arrays ``auto`` keeps to the CPU (no transfers, no GPU timings yet);
    # device arrays, which ``cpu`` refuses, go to ``cuda``
    priority = 5
    #: ``attention_with_kvcache`` (``engine.backends.cuda_decoding``): float32 arithmetic; float64
    #: is refused (consumer GPUs run it at 1/32 to 1/64 of float32)
    supports_decode = True
    decode_dtypes = ("float16", "float32", "bfloat16")
    decode_cache_dtypes = ("float16", "float32", "bfloat16")

    def __init__(self, block_q: int | None = None, block_k: int | None = None):
        self.block_q = block_q
        self.block_k = block_k
        self._why: tuple | None = None
        self._lock = threading.Lock()

    def unavailable_reason(self):
        with self._lock:
            if self._why is None:
                self._why = (self._probe(),)
            return self._why[0]

    @staticmethod
    def _probe() -> str | None:
        if importlib.util.find_spec("numba_cuda") is None:
            return "numba-cuda not installed (pip install 'attention-engine[cuda]')"
        try:
            from numba import cuda

            ok = cuda.is_available()
        except Exception as exc:  # a broken driver or toolkit install: say what it was
            return f"no CUDA GPU ({type(exc).__name__}: {exc})"
        return None if ok else "no CUDA GPU"

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if getattr(problem, "is_decode", False):  # decode_not_supported_reasons answered
            return reasons
        if max(problem.E, 1) + max(problem.Ev, 1) > CUDA_MAX_HEAD_SUM:
            reasons.append(
                f"E + Ev = {problem.E + problem.Ev} > {CUDA_MAX_HEAD_SUM} (the key/value "
                "tiles would not fit in shared memory)"
            )
        if problem.needs_backward:
            from .cuda_backward import backward_not_supported_reasons

            reasons += backward_not_supported_reasons(problem, gpu=not reasons)
        return reasons

    def decode_not_supported_reasons(self, problem) -> list[str]:
        from .cuda_decoding import cuda_decode_reasons

        return super().decode_not_supported_reasons(problem) + cuda_decode_reasons(problem)

    def decode(self, problem):
        from .cuda_decoding import run_decode

        return run_decode(problem)

    def run_backward(self, problem: AttentionProblem):
        """``(dq, dk, dv, dmask)`` on the GPU (FlashAttention-2's backward, Dao 2023, Algorithm 2,
        as three deterministic kernels: ``engine.kernels.cuda_flash_bwd``; host side in
        ``engine.backends.cuda_backward``): dq/dk/dv in the shapes and dtype of query/key/value,
        dmask in the float mask's shape and dtype or None; arrays of the inputs' kind.

        :raises engine.NotSupportedError: a score_mod without a declared derivative whose
            complex-step form numba-cuda cannot compile."""
        from .cuda_backward import run_cuda_backward

        return run_cuda_backward(self, problem)

    def run(self, problem: AttentionProblem):
        from numba import cuda

        arrays = _DeviceArrays(cuda, problem.query) if problem.on_device else _HostArrays(cuda)
        with arrays.context():
            return self._run(problem, cuda, arrays)

    def _run(self, problem, cuda, arrays):
        from ..kernels.cuda_flash_fwd import flash_kernel
        from .cuda_backward import cuda_dropout_args

        B, Hq, L, S, E, Ev = (problem.batch, problem.num_q_heads, problem.L, problem.S, problem.E, problem.Ev)
        if 0 in (B, Hq, L, Ev):
            return arrays.empty_result(problem)
        bq, bk = tile_sizes(E, Ev)
        bq = self.block_q or bq
        bk = self.block_k or bk
        ops, kind = qkv_mask_operands(problem, cuda, arrays)
        meta = np.empty((3 + B, 4), dtype=np.int64)
        for col, (_, offs, st) in enumerate(ops):
            meta[:3, col] = st
            meta[3:, col] = offs
        d_meta = cuda.to_device(meta, stream=arrays.stream)
        out = arrays.empty((B, Hq, L, Ev), problem.dtype)
        lse = arrays.empty((B, Hq, L), problem.dtype)
        mod_args = tuple(arrays.mod_arg(a) for a in problem.mod_args)
        kinds = np.full((1, 1, 1, 1), TILE_FULL, dtype=np.int8)
        if problem.mask_mod is not None:
            kinds = np.ascontiguousarray(_tile_kinds(problem, bq, bk))
        d_kinds = cuda.to_device(kinds, stream=arrays.stream)
        mask_bf16 = kind == MASK_FLOAT and ops[3][0].dtype == np.uint16
        kern = flash_kernel(
            E,
            Ev,
            bq,
            bk,
            kind,
            problem.is_causal,
            problem.score_mod,
            problem.mask_mod,
            bf16=is_bfloat16(problem.dtype),
            mask_bf16=mask_bf16,
            dropout=problem.dropout_p > 0,
        )
        grid = (math.ceil(L / bq), Hq, B)
        kern[grid, bq, arrays.stream](
            ops[0][0],
            ops[1][0],
            ops[2][0],
            ops[3][0],
            d_meta,
            L,
            S,
            problem.group,
            problem.scale,
            mod_args,
            d_kinds,
            arrays.as_numba(out),
            arrays.as_numba(lse),
            *cuda_dropout_args(problem),
        )
        return arrays.finish(out, lse, problem)
