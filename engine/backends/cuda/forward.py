"""The ``cuda`` backend's forward op: the tiled flash kernel (``engine.kernels.cuda.flash_fwd``),
one thread block per query tile, key/value tiles in shared memory. Arrays are staged as
``engine.backends.cuda.operands`` describes."""

from __future__ import annotations

import math

import numpy as np

from ...kernels.kinds import MASK_FLOAT, TILE_FULL
from ...problems.arrays import is_bfloat16
from ...problems.attention import AttentionProblem
from ...runtime.config import CUDA_BLOCK_Q, CUDA_MAX_HEAD_SUM, CUDA_TILE_SHARED_BYTES
from ..base import Op
from .operands import DeviceArrays, HostArrays, cuda_dropout_args, qkv_mask_operands, tile_kinds

__all__ = ["CudaForward", "tile_sizes", "DTYPES"]

#: float32 arithmetic; 16-bit storage. float64 is refused (consumer GPUs run it at 1/32 to 1/64 of float32)
DTYPES = ("float16", "float32", "bfloat16")


def tile_sizes(E: int, Ev: int) -> tuple[int, int]:
    """(block_q, block_k) for head sizes E and Ev: 128 query rows per block, and key tiles as long
    as fit 32 KiB of shared memory (64 rows for E = Ev = 64, 32 for E = Ev = 128), a multiple of 8."""
    width = max(E, 1) + max(Ev, 1)
    block_k = max(8, min(64, CUDA_TILE_SHARED_BYTES // (4 * width) // 8 * 8))
    return CUDA_BLOCK_Q, block_k


class CudaForward(Op):
    problem_type = AttentionProblem
    dtypes = DTYPES
    device_arrays = True
    supports_mods = True
    supports_dropout = True

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if max(problem.E, 1) + max(problem.Ev, 1) > CUDA_MAX_HEAD_SUM:
            reasons.append(
                f"E + Ev = {problem.E + problem.Ev} > {CUDA_MAX_HEAD_SUM} (the key/value "
                "tiles would not fit in shared memory)"
            )
        return reasons

    def run(self, problem: AttentionProblem):
        from numba import cuda

        arrays = DeviceArrays(cuda, problem.query) if problem.on_device else HostArrays(cuda)
        with arrays.context():
            return self._run(problem, cuda, arrays)

    def _run(self, problem, cuda, arrays):
        from ...kernels.cuda.flash_fwd import flash_kernel

        B, Hq, L, S, E, Ev = (problem.batch, problem.num_q_heads, problem.L, problem.S, problem.E, problem.Ev)
        if 0 in (B, Hq, L, Ev):
            return arrays.empty_result(problem)
        bq, bk = tile_sizes(E, Ev)
        bq = self.backend.block_q or bq
        bk = self.backend.block_k or bk
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
            kinds = np.ascontiguousarray(tile_kinds(problem, bq, bk))
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
