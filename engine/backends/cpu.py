"""The ``cpu`` backend: validation done, this wrapper lays out arrays and calls the Numba kernel."""
from __future__ import annotations

import numpy as np

from ..masks import kernel_mask
from ..threads import kernel_call_guard
from ..validation import AttentionProblem
from .base import Backend

__all__ = ["CpuBackend", "BLOCK_Q", "BLOCK_K"]

#: query rows and key columns per tile: a 64 x 256 float32 score tile (64 KiB) stays in L2
BLOCK_Q = 64
BLOCK_K = 256


def _as4(a, batch: int) -> np.ndarray:
    """C-contiguous (batch, heads, rows, features) view, or copy, of a host array."""
    a = np.ascontiguousarray(a)
    if a.ndim == 2:  # (L, E): one head, no batch
        return a.reshape((1, 1) + a.shape)
    return a.reshape((batch,) + a.shape[-3:])


class CpuBackend(Backend):
    name = "cpu"
    description = "Numba njit(parallel=True), tiled online softmax, BLAS tiles; memory linear in L"
    dtypes = ("float32", "float64")
    priority = 10

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.E == 0:
            reasons.append("E = 0 (BLAS cannot take an empty inner dimension)")
        return reasons

    def run(self, problem: AttentionProblem):
        from ..kernels.cpu_flash import MASK_BOOL, MASK_FLOAT, MASK_NONE, _flash_forward

        q, k, v = (_as4(a, problem.batch) for a in (problem.query, problem.key, problem.value))
        B, Hq, L, S = problem.batch, problem.num_q_heads, problem.L, problem.S
        if problem.attn_mask is None:
            mask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=problem.dtype), (1, Hq, L, S))
            mask_batch = np.zeros(B, dtype=np.int64)
            kind = MASK_NONE
        else:
            mask, mask_batch = kernel_mask(problem)
            kind = MASK_BOOL if problem.mask_kind == "bool" else MASK_FLOAT
        nqb = -(-L // BLOCK_Q)
        bits = np.empty((B * Hq * nqb, BLOCK_K), dtype=np.int32 if problem.dtype == np.float32 else np.int64)
        out = np.empty((B, Hq, L, problem.Ev), dtype=problem.dtype)
        lse = np.empty((B, Hq, L), dtype=problem.dtype)
        with kernel_call_guard():
            _flash_forward(q, k, v, mask, mask_batch, kind, problem.is_causal, problem.scale,
                           problem.group, BLOCK_Q, BLOCK_K, bits, out, lse)
        return out.reshape(problem.out_shape), lse.reshape(problem.lse_shape)
