"""The ``cpu`` backend's varlen backward op: lays out a validated ``VarlenBackwardProblem`` for
the ragged FlashAttention-2 backward kernel (``engine.kernels.cpu.varlen_bwd``)."""

from __future__ import annotations

import numpy as np

from ...problems.varlen import VarlenBackwardProblem
from ...runtime.entry_points import canonical_entry
from ...runtime.threads import get_num_threads, kernel_call_guard
from ..base import Op
from .operands import NO_PIN
from .tiles import backward_splits, diagonal_strip
from .varlen import tiled_setup

__all__ = ["CpuVarlenBackward", "varlen_backward_tiles"]


def varlen_backward_tiles(fq: int, block_k: int, E: int, Ev: int) -> tuple[int, int]:
    """(block_q, block_k) of the varlen backward kernel, given the forward's tiles (``fq`` x
    ``block_k``): the forward's key tiles, and query tiles of whole forward tiles, about 128 rows
    (64 for heads over 128 wide: the products' operands stay in L2), so that every score is
    recomputed by the product that computed it in the forward."""
    rows = 128 if max(E, Ev) <= 128 else 64
    return fq * max(1, rows // fq), block_k


class CpuVarlenBackward(Op):
    """``(dq, dk, dv)`` in the shapes and dtype of query, key and value, the same bits on every run
    with the same thread count."""

    problem_type = VarlenBackwardProblem
    dtypes = ("float32", "float64")
    supports_mods = True
    #: its weights are exp(score - lse) from the given lse, which holds the sinks (engine.problems.sinks)
    supports_sinks = True
    #: d lse_i / d s_ij = P_ij folds into the row's delta: dS = P * (dP - (delta - grad_lse))
    supports_lse_grad = True

    def run(self, problem: VarlenBackwardProblem):
        from ...kernels.cpu.varlen_bwd import VarlenBackwardArgs, varlen_backward_epilogue, varlen_backward_kernel

        dt = problem.dtype
        q, k, v, o, do = (
            np.ascontiguousarray(a) for a in (problem.query, problem.key, problem.value, problem.out, problem.grad_out)
        )
        lse = np.asarray(problem.lse, dtype=dt)
        lrow = np.where(np.isneginf(lse), np.inf, lse).astype(dt)  # exp(score - lrow) = 0 on empty rows
        delta = np.einsum("the,the->th", do, o)
        if problem.grad_lse is not None:
            delta = delta - np.asarray(problem.grad_lse, dtype=delta.dtype)
        delta = delta.astype(dt)
        threads = get_num_threads()
        provider, pin, plan, jit = tiled_setup(problem, dt, threads)
        block_q, block_k = varlen_backward_tiles(plan.block_q, plan.block_k, problem.E, problem.Ev)
        max_key_tiles = -(-problem.max_seqlen_k // block_k)
        live = int(np.count_nonzero((problem.seqlens_q > 0) & (problem.seqlens_k > 0)))
        splits = backward_splits(max(1, live) * problem.num_kv_heads, threads, max(1, max_key_tiles))
        gemm = (provider.kind, provider.pointer(dt.name))
        dq_part = np.zeros((splits,) + q.shape, dtype=dt)
        dk, dv = np.zeros_like(k), np.zeros_like(v)
        args = VarlenBackwardArgs(
            q=q,
            k=k,
            v=v,
            do=do,
            lrow=lrow,
            delta=delta,
            cu_q=problem.cu_seqlens_q,
            cu_k=problem.cu_seqlens_k,
            causal=problem.is_causal,
            left=problem.window[0],
            right=problem.window[1],
            scale=problem.scale,
            group=problem.group,
            block_q=block_q,
            block_k=block_k,
            fq=plan.block_q,
            strip=diagonal_strip(plan.block_q),
            splits=splits,
            threads=threads,
            has_score_mod=problem.score_mod is not None,
            has_mask_mod=problem.mask_mod is not None,
            gemm_kind=gemm[0],
            gemm_fn=gemm[1],
            jit_scores=jit[0],
            jit_scores_h=jit[1],
            dq_part=dq_part,
            dk=dk,
            dv=dv,
        )
        kernel = varlen_backward_kernel(problem.score_mod, problem.score_grad, problem.mask_mod)
        with kernel_call_guard(), NO_PIN if pin is None else pin():
            (canonical_entry(kernel, (args, problem.mod_args)) or kernel)(args, problem.mod_args)
            dq = np.empty_like(q)
            varlen_backward_epilogue(dq_part, dt.type(problem.scale), dq)
        return dq, dk, dv
