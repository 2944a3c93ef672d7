"""The ``cpu`` backend's backward op: lays out a validated ``BackwardProblem`` and calls the
backward kernel (``engine.kernels.cpu.flash_bwd``, FlashAttention-2's backward on CPU tiles)."""

from __future__ import annotations

import numpy as np

from ...kernels.cpu.gemm import GEMM_NUMPY
from ...problems.attention import BackwardProblem
from ...problems.masks import reduce_to_shape
from ...problems.mods import compile_mods_alone
from ...runtime.gemm_providers import get_gemm_provider
from ...runtime.threads import get_num_threads, kernel_call_guard
from ..base import Op
from .blas_pin import get_blas_pin
from .operands import ALL_FULL, NO_PIN, as4, dropout_args, kernel_masks, tile_kinds
from .tiles import backward_splits, backward_tile_sizes, split_bounds

__all__ = ["CpuBackward"]


class CpuBackward(Op):
    """Gradients ``(dq, dk, dv, dmask)`` in the shapes and dtype of query/key/value (dmask: the
    float mask's gradient in its shape and dtype, or None), the same bits on every run with the
    same thread count."""

    problem_type = BackwardProblem
    dtypes = ("float32", "float64")
    supports_mods = True
    supports_dropout = True

    def not_supported_reasons(self, problem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.E == 0:
            reasons.append("E = 0 (BLAS cannot take an empty inner dimension)")
        return reasons

    def run(self, problem: BackwardProblem):
        from ...kernels.cpu.flash_bwd import BackwardArgs, _backward_epilogue, _backward_prologue, backward_kernel

        B, Hq, H, L, S, E, Ev = (
            problem.batch,
            problem.num_q_heads,
            problem.num_kv_heads,
            problem.L,
            problem.S,
            problem.E,
            problem.Ev,
        )
        dt = problem.dtype
        q, k, v, o, do = (as4(a, B) for a in (problem.query, problem.key, problem.value, problem.out, problem.grad_out))
        lse = np.ascontiguousarray(problem.lse, dtype=dt).reshape(B, Hq, L)
        fmask, bmask, mask_batch, kind = kernel_masks(problem)
        # the forward's provider and tiles: the scores are recomputed with the very same products
        provider = get_gemm_provider(dt.name)
        gemm = (provider.kind, provider.pointer(dt.name))
        pin = get_blas_pin() if gemm[0] == GEMM_NUMPY else None
        block_q, block_k, fq = backward_tile_sizes(
            L, S, E, Ev, blas_pinned=pin is None or pin.available, dtype_name=dt.name, provider=provider.name
        )
        nqb, nkb = -(-L // block_q), -(-S // block_k)
        splits = backward_splits(B * H, get_num_threads(), nkb)
        # work per key tile: the query tiles it meets (causal: those at or below the diagonal)
        first = (np.arange(nkb) * block_k // block_q) if problem.is_causal else np.zeros(nkb, np.int64)
        bounds = split_bounds(nqb - first, splits)
        compile_mods_alone(problem.score_mod, problem.mask_mod, problem.mod_args, dt)
        tiles = ALL_FULL
        if problem.mask_mod is not None:
            tiles = tile_kinds(problem, block_q, block_k)
        want_dm = problem.return_mask_grad
        mshape = tuple(problem.attn_mask.shape) if want_dm else ()
        dm_rows = want_dm and len(mshape) >= 2 and mshape[-2] != 1
        dm_cols = want_dm and mshape[-1] != 1
        dm = np.zeros((B, Hq, L if dm_rows else 1, S if dm_cols else nkb) if want_dm else (1, 1, 1, 1))
        qs = np.empty_like(q)
        qst = np.empty((B, Hq, -(-L // fq), E * fq), dtype=dt)
        lrow = np.empty((B, Hq, L), dtype=dt)
        delta = np.empty((B, Hq, L), dtype=dt)
        dq_part = np.zeros((splits, B, Hq, L, E), dtype=dt)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        kernel = backward_kernel(problem.score_mod, problem.score_grad, problem.mask_mod)
        _backward_prologue(q, o, do, lse, problem.scale, fq, qs, qst, delta, lrow)
        threshold, keep, seed_lo, seed_hi = dropout_args(problem)
        args = BackwardArgs(
            qs=qs,
            qst=qst,
            fq=fq,
            k=k,
            v=v,
            do=do,
            lrow=lrow,
            delta=delta,
            fmask=fmask,
            bmask=bmask,
            mask_batch=mask_batch,
            mask_kind=kind,
            causal=problem.is_causal,
            group=problem.group,
            block_q=block_q,
            block_k=block_k,
            splits=splits,
            bounds=bounds,
            has_score_mod=problem.score_mod is not None,
            tile_kinds=tiles,
            drop_threshold=threshold,
            drop_keep=keep,
            seed_lo=seed_lo,
            seed_hi=seed_hi,
            gemm_kind=gemm[0],
            gemm_fn=gemm[1],
            dm_rows=dm_rows,
            dm_cols=dm_cols,
            want_dm=want_dm,
            dq_part=dq_part,
            dk=dk,
            dv=dv,
            dm=dm,
        )
        with kernel_call_guard(), NO_PIN if pin is None else pin():
            kernel(args, problem.mod_args)
        _backward_epilogue(dq_part, problem.scale, dq)
        dmask = None
        if want_dm:
            if not dm_cols:  # per key tile -> the mask's one column
                dm = dm.sum(axis=-1, keepdims=True)
            dm = dm.reshape(problem.batch_shape + (Hq,) + dm.shape[-2:]) if problem.query.ndim > 2 else dm[0, 0]
            dmask = reduce_to_shape(dm, mshape).astype(problem.attn_mask.dtype)
        return (dq.reshape(problem.query.shape), dk.reshape(problem.key.shape), dv.reshape(problem.value.shape), dmask)
