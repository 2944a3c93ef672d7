"""How the ``cuda`` backend's ops stage their operands: NumPy inputs copied to the GPU and back
(:class:`HostArrays`), device inputs read in place through their strides with results allocated by
the caller's library on the caller's stream (:class:`DeviceArrays`); the flat layouts the kernels
index; the dropout arguments; the mask_mod's tile map. Importing it needs no GPU."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ...kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE
from ...kernels.philox import dropout_threshold, split_seed
from ...problems.arrays import is_bfloat16
from ...problems.attention import AttentionProblem

__all__ = [
    "HostArrays",
    "DeviceArrays",
    "flat_layout",
    "qkv_mask_operands",
    "tile_kinds",
    "host_copy",
    "dummy",
    "torch_dtype",
    "bits_dtype",
    "cuda_dropout_args",
]


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


class HostArrays:
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
            return dummy(self.cuda, a.dtype, problem, self.stream)
        lo, span, offs, st = flat_layout(a.shape, a.strides, a.itemsize, problem.batch_shape, rank)
        return self.cuda.to_device(a.reshape(-1), stream=self.stream), offs, st

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype=bits_dtype(dtype), stream=self.stream)

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
        from ..base import empty_result

        return empty_result(problem)


class DeviceArrays:
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
            return dummy(self.cuda, dtype, problem, self.stream)
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
            return self.lib.empty(shape, dtype=torch_dtype(self.lib, dtype), device=self.device)
        if self.kind == "cupy":
            return self.lib.empty(shape, dtype=dtype)
        return self.cuda.device_array(shape, dtype=bits_dtype(dtype), stream=self.stream)

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
        from ..base import empty_result

        o, s = empty_result(problem)
        if self.kind == "torch":
            dt = torch_dtype(self.lib, problem.dtype)
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
        ops.append(dummy(cuda, np.bool_, problem, arrays.stream))
    return ops, kind


def tile_kinds(problem: AttentionProblem, block_q: int, block_k: int) -> np.ndarray:
    """The mask_mod's block map at the kernel's tiles, computed on the host (by the cpu
    classifier; device arrays among ``mod_args`` are copied to the host for it): from the
    caller's block mask when there is one (memoised there), else built for this call."""
    from ...problems.mods import create_block_mask

    bm = problem.block_mask
    if bm is None:
        args = tuple(host_copy(a) for a in problem.mod_args)
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


def host_copy(value):
    if hasattr(value, "__cuda_array_interface__"):
        from numba import cuda

        return cuda.as_cuda_array(value).copy_to_host()
    return value


def dummy(cuda, dtype, problem, stream):
    """A one-element stand-in for an operand the kernel never reads (no mask, or size 0)."""
    return (cuda.to_device(np.zeros(1, dtype=dtype), stream=stream), np.zeros(problem.batch, dtype=np.int64), (0, 0, 0))


def torch_dtype(torch, dtype):
    if is_bfloat16(np.dtype(dtype)):
        return torch.bfloat16
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


def bits_dtype(dtype):
    """The dtype the kernel stores: bfloat16 as its uint16 bit patterns, others as they are."""
    return np.dtype(np.uint16) if is_bfloat16(np.dtype(dtype)) else np.dtype(dtype)


def cuda_dropout_args(problem: AttentionProblem) -> tuple:
    """The kernels' last four arguments: ``(threshold, seed_lo, seed_hi, keep)`` as uint64,
    uint64, uint64, float32 (``keep`` = 1 / (1 - p)); ``(0, 0, 0, 1.0)`` without dropout."""
    if problem.dropout_p == 0:
        return (np.uint64(0), np.uint64(0), np.uint64(0), np.float32(1.0))
    lo, hi = split_seed(problem.dropout_seed)
    keep = 0.0 if problem.dropout_p == 1 else 1.0 / (1.0 - problem.dropout_p)
    return (np.uint64(dropout_threshold(problem.dropout_p)), np.uint64(lo), np.uint64(hi), np.float32(keep))
