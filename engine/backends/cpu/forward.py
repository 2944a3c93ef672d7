"""The ``cpu`` backend's forward op: lays out a validated ``AttentionProblem`` and calls the tiled
flash kernel (``engine.kernels.cpu.flash_fwd``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ...kernels.cpu.gemm import GEMM_CBLAS, GEMM_CBLAS_BF16, GEMM_CBLAS_F16, GEMM_NUMPY
from ...problems.attention import AttentionProblem
from ...problems.base import dtype_name
from ...problems.mods import compile_mods_alone
from ...runtime.config import (
    BLAS_SINGLE_THREAD_MNK,
    CPU_QUIET_OPENMP_MIN_WORK,
    CPU_SERIAL_MAX_WORK,
    CPU_TUNE_MIN_WORK,
)
from ...runtime.gemm_jit import NO_JIT, tile_jit_kernels
from ...runtime.gemm_providers import gemm_mode, get_gemm_provider, sixteen_bit_gemm
from ...runtime.threads import get_num_threads, kernel_call_guard, quiet_openmp
from ...runtime.tuning import autotune_enabled
from ..base import Op
from .autotune import tune_provider, tune_tiles
from .blas_pin import get_blas_pin
from .operands import ALL_FULL, NO_PIN, SIXTEEN_BIT, as4, dropout_args, kernel_masks, narrow, tile_kinds, widen
from .tiles import TilePlan, forward_tiles, tile_class

__all__ = ["CpuForward"]

_kernel_module = None


def kernels():
    """The kernel module, imported on first use (``import engine`` compiles nothing)."""
    global _kernel_module
    if _kernel_module is None:
        from ...kernels.cpu import flash_fwd

        _kernel_module = flash_fwd
    return _kernel_module


class CpuForward(Op):
    problem_type = AttentionProblem
    dtypes = ("float32", "float64") + SIXTEEN_BIT
    supports_mods = True
    supports_dropout = True
    supports_causal_offset = True

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.E == 0:
            reasons.append("E = 0 (BLAS cannot take an empty inner dimension)")
        return reasons

    def run(self, problem: AttentionProblem, plan: TilePlan | None = None, provider=None, serial: bool | None = None):
        """``(out, lse)``. ``plan``, ``provider`` (a ``GemmProvider``; float operands) and
        ``serial`` override the tiles, the GEMM provider and the choice of the kernel's serial
        build (the tile measurement, ``autotune``, uses them); by default they are chosen here."""
        if dtype_name(problem.dtype) in SIXTEEN_BIT:  # memoised: dtype.name costs microseconds
            return self._run_16bit(problem, plan, provider, serial)
        return self._run(problem, plan=plan, provider=provider, serial=serial)

    def _run_16bit(self, problem: AttentionProblem, plan, provider, serial):
        """A 16-bit problem: through a mixed-precision GEMM on the 16-bit bits where one is chosen
        (``engine.runtime.gemm_providers.sixteen_bit_gemm``), else widened to float32 (exact). Either way
        the kernel computes in float32 and the output and lse are rounded once to the input dtype.
        A float mask is widened to float32 (exact, as the reference adds it)."""
        f32 = np.dtype(np.float32)
        mask = problem.attn_mask
        if problem.mask_kind == "float":
            mask = np.asarray(mask).astype(f32)
        name = problem.dtype.name
        half = sixteen_bit_gemm(name) if provider is None else None
        v = as4(problem.value, problem.batch)
        if half is not None and np.isfinite(np.sum(v, dtype=np.float32)):
            bits = tuple(as4(a, problem.batch).view(np.uint16) for a in (problem.query, problem.key))
            kind = GEMM_CBLAS_BF16 if name == "bfloat16" else GEMM_CBLAS_F16
            if plan is None:
                plan = self._tiles(problem, name, half.name, None, True)
            out, lse = self._run(
                dataclasses.replace(problem, attn_mask=mask, dtype=f32),
                arrays=bits + (v.view(np.uint16),),
                gemm=(kind, half.pointer(name)),
                plan=plan,
                serial=serial,
            )
        else:  # widened: O(L) next to the O(L^2) kernel
            q32, k32 = (widen(as4(a, problem.batch)) for a in (problem.query, problem.key))
            wide = dataclasses.replace(problem, query=q32, key=k32, value=widen(v), attn_mask=mask, dtype=f32)
            out, lse = self._run(wide, plan=plan, provider=provider, serial=serial)
        return narrow(out, problem.dtype), lse if problem.lse_float32 else narrow(lse, problem.dtype)

    def _tiles(self, problem: AttentionProblem, dtype: str, provider_name: str, provider, pinned: bool) -> TilePlan:
        """The call's tiles (``tiles.forward_tiles``); a large call of a class whose tiles are not
        known yet measures them first (``autotune``, once per machine)."""
        E, Ev, L = problem.E, problem.Ev, problem.L
        cls = tile_class(L, E, Ev)
        if (
            pinned
            and cls is not None
            and problem.batch * problem.num_q_heads * L * problem.S * (E + Ev) >= CPU_TUNE_MIN_WORK
            and autotune_enabled()
        ):
            tune_tiles(self.run, provider, np.dtype(problem.dtype) if provider is None else np.dtype(dtype), *cls)
        return forward_tiles(
            L, E, Ev, dtype, provider_name, pinned, problem.batch * problem.num_q_heads, get_num_threads()
        )

    def _run(self, problem: AttentionProblem, arrays=None, gemm=None, plan=None, provider=None, serial=None):
        """The kernel call. ``arrays``: ready (batch, heads, rows, features) q, k, v (the 16-bit
        path's uint16 bits; v already checked finite), with ``gemm`` = (kind, address)."""
        # a NaN/inf value in V reaches only the rows that weigh it: the kernel checks each tile's
        # product and recomputes a non-finite one exactly (kernels.nonfinite), so no pass over V here
        B = problem.batch
        if arrays is None:
            arrays = tuple(as4(a, B) for a in (problem.query, problem.key, problem.value))
        q, k, v = arrays
        Hq, L, S = problem.num_q_heads, problem.L, problem.S
        fmask, bmask, mask_batch, kind = kernel_masks(problem)
        jit = NO_JIT
        name = dtype_name(problem.dtype)
        if gemm is None:
            if provider is None:
                if (
                    B * Hq * L * S * (problem.E + problem.Ev) >= CPU_TUNE_MIN_WORK
                    and autotune_enabled()
                    and gemm_mode() == "auto"
                ):
                    tune_provider(self.run, name)
                provider = get_gemm_provider(name)
            gemm = (provider.kind, provider.pointer(name))
        # only np.dot's OpenBLAS starts threads of its own; the other providers are sequential
        pin = get_blas_pin() if gemm[0] == GEMM_NUMPY else None
        pinned = pin is None or pin.available
        if plan is None or not pinned:
            plan = self._tiles(problem, name, provider.name, provider, pinned)
        block_q, block_k, sub_tiles = plan.block_q, plan.block_k, plan.sub_tiles
        # tiles this small never make OpenBLAS start threads: no pin (it costs microseconds)
        small = min(block_q, L) * min(block_k, S) * max(problem.E, problem.Ev) <= BLAS_SINGLE_THREAD_MNK
        if pin is None or small:
            pin = NO_PIN
        else:
            pin = pin()
        if gemm[0] == GEMM_CBLAS:
            jit = tile_jit_kernels(provider, name, block_q, block_k, problem.E, problem.Ev)
        compile_mods_alone(problem.score_mod, problem.mask_mod, problem.mod_args, problem.dtype)
        tiles = ALL_FULL
        if problem.mask_mod is not None:
            tiles = tile_kinds(problem, block_q, block_k)
        out = np.empty((B, Hq, L, problem.Ev), dtype=problem.dtype)
        lse = np.empty((B, Hq, L), dtype=problem.dtype)
        if serial is None:
            serial = B * Hq * L * S * (problem.E + problem.Ev) <= CPU_SERIAL_MAX_WORK
        kernel = kernels().flash_kernel(problem.score_mod, problem.mask_mod, serial)
        threshold, keep, seed_lo, seed_hi = dropout_args(problem)
        args = kernels().FlashArgs(
            q=q,
            k=k,
            v=v,
            fmask=fmask,
            bmask=bmask,
            mask_batch=mask_batch,
            mask_kind=kind,
            causal=problem.is_causal,
            causal_offset=problem.causal_offset,
            scale=problem.scale,
            group=problem.group,
            block_q=block_q,
            block_k=block_k,
            sub_tiles=sub_tiles,
            has_score_mod=problem.score_mod is not None,
            tile_kinds=tiles,
            drop_threshold=threshold,
            drop_keep=keep,
            seed_lo=seed_lo,
            seed_hi=seed_hi,
            gemm_kind=gemm[0],
            gemm_fn=gemm[1],
            jit_scores=jit[0],
            jit_scores_h=jit[1],
            jit_values=jit[2],
            jit_values_h=jit[3],
            out=out,
            lse=lse,
        )
        with kernel_call_guard(), pin:
            if not serial and B * Hq * L * S * (problem.E + problem.Ev) >= CPU_QUIET_OPENMP_MIN_WORK:
                quiet_openmp()  # torch's idle workers would spin on our cores (runtime.threads)
            kernel(args, problem.mod_args)
        return out.reshape(problem.out_shape), lse.reshape(problem.lse_shape)
