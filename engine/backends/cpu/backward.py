"""The ``cpu`` backend's backward op: lays out a validated ``BackwardProblem`` and calls the
backward kernel (``engine.kernels.cpu.flash_bwd``, FlashAttention-2's backward on CPU tiles)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ...kernels.cpu.gemm import GEMM_CBLAS, GEMM_NUMPY
from ...problems.attention import BackwardProblem
from ...problems.backward import Gradients
from ...problems.base import dtype_name
from ...problems.masks import reduce_to_shape
from ...problems.mod_args_grad import mod_args_offsets
from ...problems.mods import compile_mods_alone
from ...runtime.entry_points import canonical_entry
from ...runtime.gemm_jit import NO_JIT, tile_jit_kernels
from ...runtime.gemm_providers import get_gemm_provider
from ...runtime.threads import get_num_threads, kernel_call_guard
from ..base import Op
from .blas_pin import get_blas_pin
from .operands import ALL_FULL, SIXTEEN_BIT, as4, dropout_args, kernel_masks, narrow, tile_kinds, widen
from .tiles import backward_splits, backward_tile_sizes, split_bounds

__all__ = ["CpuBackward"]


class CpuBackward(Op):
    """:class:`~engine.problems.backward.Gradients` in the shapes and dtypes of query/key/value
    (the float mask's and the marked ``mod_args``' in theirs), the same bits on every run with the
    same thread count. 16-bit inputs are widened to float32 (exact), computed in float32 and the
    gradients rounded once to the input dtype, as FlashAttention computes in float32."""

    problem_type = BackwardProblem
    dtypes = ("float32", "float64") + SIXTEEN_BIT
    supports_mods = True
    supports_dropout = True
    #: its weights are exp(score - lse) from the given lse, which holds the sinks (engine.problems.sinks)
    supports_sinks = True
    supports_causal_offset = True
    supports_lse_grad = True
    supports_mod_args_grad = True

    def not_supported_reasons(self, problem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.E == 0:
            reasons.append("E = 0 (BLAS cannot take an empty inner dimension)")
        return reasons

    def run(self, problem: BackwardProblem) -> Gradients:
        if dtype_name(problem.dtype) in SIXTEEN_BIT:
            return self._run_16bit(problem)
        return self._run(problem)

    def _run_16bit(self, problem: BackwardProblem) -> Gradients:
        """float16/bfloat16: every input widened to float32 (exact; the lse as the caller gives it,
        so a float32 lse keeps the weights exact to float32), the float32 kernel, the gradients of
        query, key and value rounded once to the input dtype."""
        f32 = np.dtype(np.float32)
        wide = {
            n: widen(np.ascontiguousarray(getattr(problem, n))) for n in ("query", "key", "value", "out", "grad_out")
        }
        lse = np.asarray(problem.lse)
        wide["lse"] = widen(lse) if lse.dtype.itemsize == 2 else lse.astype(f32)
        if problem.mask_kind == "float":
            wide["attn_mask"] = np.asarray(problem.attn_mask).astype(f32)
        if problem.grad_lse is not None:
            wide["grad_lse"] = np.asarray(problem.grad_lse).astype(f32)
        grads = self._run(dataclasses.replace(problem, dtype=f32, **wide))
        dq, dk, dv = (
            narrow(g, problem.dtype).reshape(getattr(problem, n).shape)
            for g, n in zip(grads[:3], ("query", "key", "value"))
        )
        dmask = grads.dmask
        if dmask is not None:
            dmask = dmask.astype(np.asarray(problem.attn_mask).dtype)
        return grads._replace(dq=dq, dk=dk, dv=dv, dmask=dmask)

    def _run(self, problem: BackwardProblem) -> Gradients:
        from ...kernels.cpu.flash_bwd import BackwardArgs, _backward_epilogue, _backward_prologue, backward_kernel
        from ...kernels.mod_arg_grad import READS_CAPACITY

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
        if not q.flags.writeable:  # the kernel reads q itself now: one compiled signature, not two
            q = q.copy()
        lse = np.ascontiguousarray(problem.lse, dtype=dt).reshape(B, Hq, L)
        dlse = np.zeros((1, 1, 1))
        if problem.grad_lse is not None:
            dlse = np.ascontiguousarray(problem.grad_lse, dtype=np.float64).reshape(B, Hq, L)
        fmask, bmask, mask_batch, kind = kernel_masks(problem)
        # the forward's provider and tiles: the scores are recomputed with the very same products
        provider = get_gemm_provider(dt.name, max(E, Ev))
        gemm = (provider.kind, provider.pointer(dt.name))
        # the forward's tiles: large ones when its score products cannot start threads (a sequential
        # provider, or np.dot's OpenBLAS held at one thread)
        pin = get_blas_pin()
        block_q, block_k, fq = backward_tile_sizes(
            L,
            S,
            E,
            Ev,
            blas_pinned=gemm[0] != GEMM_NUMPY or pin.available,
            dtype_name=dt.name,
            provider=provider.name,
        )
        # and the forward's generated kernel for its full score tiles
        jit = tile_jit_kernels(provider, dt.name, fq, block_k, E, Ev) if gemm[0] == GEMM_CBLAS else NO_JIT
        nqb, nkb = -(-L // block_q), -(-S // block_k)
        threads = get_num_threads()
        splits = backward_splits(B * H, threads, nkb)
        # work per key tile: the query tiles it meets (causal: those at or below the diagonal)
        first = np.zeros(nkb, np.int64)
        if problem.is_causal:
            first = np.clip((np.arange(nkb) * block_k - problem.causal_offset) // block_q, 0, nqb)
        bounds = split_bounds(nqb - first, splits)
        # mod_args gradients: one float64 accumulator per slot, a slot running a fixed set of tasks
        # in a fixed order (summed in slot order below): the same bits on every run
        want_arg = bool(problem.mod_args_grad) and problem.arg_grad is not None
        offsets = mod_args_offsets(problem.mod_args_grad, problem.mod_args) if want_arg else np.zeros(1, np.int64)
        tasks = B * H * splits
        slots = min(tasks, threads) if want_arg else tasks
        arg_acc = np.zeros((slots, int(offsets[-1])) if want_arg else (1, 1))
        arg_reads = np.zeros(tasks if want_arg else 1, dtype=np.int64)
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
        lrow = np.empty((B, Hq, L), dtype=dt)
        delta = np.empty((B, Hq, L), dtype=np.float64)
        dq_part = np.zeros((splits, B, Hq, L, E), dtype=dt)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        kernel = backward_kernel(problem.score_mod, problem.score_grad, problem.mask_mod, problem.arg_grad)
        _backward_prologue(q, o, do, lse, dlse, problem.grad_lse is not None, problem.scale, qs, delta, lrow)
        threshold, keep, seed_lo, seed_hi = dropout_args(problem)
        args = BackwardArgs(
            q=q,
            qs=qs,
            scale=problem.scale,
            fq=fq,
            jit_scores=jit[0],
            jit_scores_h=jit[1],
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
            causal_offset=problem.causal_offset,
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
            slots=slots,
            want_arg_grad=want_arg,
            arg_offsets=offsets,
            arg_acc=arg_acc,
            arg_reads=arg_reads,
        )
        # the other four products are np.dot's (SciPy's OpenBLAS) whatever the provider: held at one
        # thread always (unpinned, each task's large tile products started OpenBLAS threads of their
        # own: 8-15x slower on a loaded machine)
        call = canonical_entry(kernel, (args, problem.mod_args)) or kernel  # one overload per dtype
        with kernel_call_guard(), pin():
            call(args, problem.mod_args)
        _backward_epilogue(dq_part, problem.scale, dq)
        dmask = None
        if want_dm:
            if not dm_cols:  # per key tile -> the mask's one column
                dm = dm.sum(axis=-1, keepdims=True)
            dm = dm.reshape(problem.batch_shape + (Hq,) + dm.shape[-2:]) if problem.query.ndim > 2 else dm[0, 0]
            dmask = reduce_to_shape(dm, mshape).astype(problem.attn_mask.dtype)
        dmod_args = None
        if want_arg:
            if arg_reads.max() > READS_CAPACITY:
                raise ValueError(
                    f"the score_mod read {int(arg_reads.max())} elements of the mod_args that take a gradient "
                    f"for one score; the backward differentiates at most {READS_CAPACITY} per score"
                )
            total = arg_acc[0].copy()
            for slot in range(1, slots):  # in slot order: deterministic
                total += arg_acc[slot]
            dmod_args = tuple(
                total[offsets[i] : offsets[i] + a.size].reshape(a.shape).astype(a.dtype) if m else None
                for i, (a, m) in enumerate(zip(problem.mod_args, problem.mod_args_grad))
            )
        return Gradients(
            dq=dq.reshape(problem.query.shape),
            dk=dk.reshape(problem.key.shape),
            dv=dv.reshape(problem.value.shape),
            dmask=dmask,
            dmod_args=dmod_args,
        )
