"""The ``cpu`` backend: validation done, this wrapper lays out arrays and calls the Numba kernel."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading

import numpy as np

from ..config import (
    BLAS_SINGLE_THREAD_MNK,
    CPU_BIG_BLOCK_Q,
    CPU_BLOCK_K,
    CPU_BLOCK_Q,
    CPU_BWD_BLOCK_Q,
    CPU_BWD_MIN_TASKS_PER_THREAD,
    CPU_SERIAL_MAX_WORK,
    CPU_TASK_ROWS,
)
from ..gemm_providers import get_gemm_provider, sixteen_bit_gemm
from ..kernels.gemm import GEMM_NUMPY
from ..kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE, TILE_FULL
from ..kernels.philox import dropout_threshold, split_seed
from ..masks import kernel_mask, reduce_to_shape
from ..threads import get_num_threads, kernel_call_guard
from ..validation import AttentionProblem
from .base import Backend, dtype_name

__all__ = ["CpuBackend", "tile_sizes", "backward_tile_sizes", "backward_splits", "split_bounds", "dropout_args"]


class _BlasPin:
    """Holds SciPy's OpenBLAS (the BLAS of ``np.dot`` inside Numba kernels) at one thread while any
    kernel call runs, so each parallel task's GEMM runs on its own core and tiles can be larger
    than OpenBLAS's multithreading threshold (17% faster at L = 4096 than 64 x 64 tiles).

    OpenBLAS's thread count is process-wide (its ``_local`` setter is too), so calls are counted:
    the first to enter saves and sets 1, the last to leave restores. Meanwhile SciPy BLAS calls
    from other Python threads also run on one thread: slower, never wrong. ``available`` is False
    when the setter cannot be found; tiles then stay under the threshold instead.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None
        self._get = self._set = None
        self.available = False
        try:
            import scipy.linalg.cython_blas as cython_blas

            lib = ctypes.CDLL(cython_blas.__file__)  # dlsym also searches its OpenBLAS dependency
            for prefix in ("scipy_", ""):
                try:
                    self._get = getattr(lib, prefix + "openblas_get_num_threads")
                    self._set = getattr(lib, prefix + "openblas_set_num_threads")
                    break
                except AttributeError:
                    continue
            self.available = self._set is not None
        except (ImportError, OSError):
            pass

    def __call__(self) -> "_BlasPin":
        """The pin as a context manager (a class, not a generator: cheaper to enter and leave)."""
        return self

    def __enter__(self):
        if self.available:
            with self._lock:
                if self._users == 0:
                    self._saved = self._get()
                    if self._saved != 1:
                        self._set(1)
                self._users += 1
        return self

    def __exit__(self, *exc):
        if self.available:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved not in (None, 1):
                    self._set(self._saved)
        return False


_blas_pin: _BlasPin | None = None
_blas_pin_lock = threading.Lock()


def _get_blas_pin() -> _BlasPin:
    """The one process-wide pin (created under a lock: two pins would count users separately)."""
    global _blas_pin
    with _blas_pin_lock:
        if _blas_pin is None:
            _blas_pin = _BlasPin()
        return _blas_pin


def tile_sizes(L: int, E: int, Ev: int, blas_pinned: bool = False) -> tuple[int, int]:
    """(block_q, block_k) for a problem. ``blas_pinned``: BLAS is held at one thread, so tiles
    may be large (128 x 256, 64 x 256 for heads over 128 wide). Otherwise block_k is a multiple of
    16, 16 to 256, and block_q * block_k * max(E, Ev) <= the BLAS single-thread threshold wherever
    E, Ev <= 16384 (block_q shrinks for very large heads)."""
    width = max(E, Ev, 1)
    if blas_pinned:
        return max(1, min(CPU_BIG_BLOCK_Q if width <= 128 else CPU_BLOCK_Q, L)), CPU_BLOCK_K
    block_q = max(1, min(CPU_BLOCK_Q, L))
    block_k = max(16, min(CPU_BLOCK_K, BLAS_SINGLE_THREAD_MNK // (block_q * width) // 16 * 16))
    if block_q * block_k * width > BLAS_SINGLE_THREAD_MNK:
        block_q = max(1, BLAS_SINGLE_THREAD_MNK // (block_k * width))
    return block_q, block_k


def backward_tile_sizes(L: int, S: int, E: int, Ev: int, blas_pinned: bool = False) -> tuple[int, int, int]:
    """(block_q, block_k, fq) of the backward kernel. The forward's tiles are (fq, block_k)
    (:func:`tile_sizes`); the backward's key tiles are the forward's and its query tiles a
    multiple of fq, about ``CPU_BWD_BLOCK_Q`` rows when BLAS is held at one thread (one fq
    otherwise, under OpenBLAS's threshold), so that it recomputes each score with the very
    product the forward used."""
    fq, block_k = tile_sizes(L, E, Ev, blas_pinned=blas_pinned)
    block_q = fq * max(1, CPU_BWD_BLOCK_Q // fq) if blas_pinned else fq
    return max(1, min(block_q, L)), max(1, min(block_k, S)), fq


def backward_splits(tasks: int, threads: int, key_tiles: int) -> int:
    """How many runs of key tiles each (batch, kv head) is cut into, so that every thread has
    work: 1 when ``tasks`` (batch x kv heads) is a multiple of ``threads``; else the smallest
    count that makes ``tasks * splits`` a multiple of ``threads`` or at least
    ``CPU_BWD_MIN_TASKS_PER_THREAD * threads``; never more than ``key_tiles``. A function of the
    thread count and the shapes only: the gradients depend on it (the dQ sums' order), nothing
    else does."""
    splits = 1
    while (tasks * splits) % threads and tasks * splits < CPU_BWD_MIN_TASKS_PER_THREAD * threads:
        splits += 1
    return max(1, min(splits, key_tiles))


def split_bounds(work: np.ndarray, splits: int) -> np.ndarray:
    """Cut key tiles with these work counts into ``splits`` contiguous runs of about equal work:
    int64 bounds, ``splits + 1`` entries from 0 to ``len(work)``, each inner bound where the
    cumulative work comes closest to its share."""
    total = np.concatenate([[0.0], np.cumsum(work, dtype=np.float64)])  # work before bound i
    targets = total[-1] * np.arange(1, splits) / splits
    above = np.clip(np.searchsorted(total, targets), 1, len(total) - 1)  # total[above] >= target
    inner = np.where(total[above] - targets <= targets - total[above - 1], above, above - 1)
    bounds = np.concatenate([[0], inner, [len(work)]]).astype(np.int64)
    return np.maximum.accumulate(bounds)


def dropout_args(problem: AttentionProblem) -> tuple:
    """The kernels' ``dropout`` argument: (threshold, 1 / (1 - p), seed_lo, seed_hi), typed so
    that one compiled signature serves every call (``(0, 1.0, 0, 0)`` without dropout)."""
    if problem.dropout_p == 0:
        return (np.uint64(0), 1.0, np.uint64(0), np.uint64(0))
    lo, hi = split_seed(problem.dropout_seed)
    keep = 0.0 if problem.dropout_p == 1 else 1.0 / (1.0 - problem.dropout_p)
    return (np.uint64(dropout_threshold(problem.dropout_p)), keep, np.uint64(lo), np.uint64(hi))


#: the tile map of a call without mask_mod: every tile full
_ALL_FULL = np.full((1, 1, 1, 1), TILE_FULL, dtype=np.int8)
_NO_PIN = contextlib.nullcontext()
_dummies: dict = {}


def _dummy_masks(dtype: np.dtype):
    """(float mask, bool mask) placeholders for the kernel's unused mask slots, one pair per dtype:
    read-only and not contiguous, so they have the Numba type of a real broadcast mask (one
    compiled signature); the kernel never reads them."""
    pair = _dummies.get(dtype)
    if pair is None:
        pair = _dummies[dtype] = (
            np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (1, 1, 1, 2)),
            np.broadcast_to(np.ones((1, 1, 1, 1), dtype=np.bool_), (1, 1, 1, 2)),
        )
    return pair


def _kernels():
    """The kernel module, imported on first use (``import engine`` compiles nothing)."""
    global _kernel_module
    if _kernel_module is None:
        from ..kernels import cpu_flash_fwd

        _kernel_module = cpu_flash_fwd
    return _kernel_module


_kernel_module = None


def _kernel_masks(problem: AttentionProblem):
    """``(fmask, bmask, mask_batch, kind)`` for the kernels. Both mask slots are always filled (a
    dummy the kernel never reads for the unused one), so a kernel compiles once per dtype instead
    of once per mask kind."""
    fmask, bmask = _dummy_masks(problem.dtype)
    mask_batch = np.zeros(problem.batch, dtype=np.int64)
    kind = MASK_NONE
    if problem.attn_mask is not None:
        mask, mask_batch = kernel_mask(problem)
        mask_batch = np.array(mask_batch, dtype=np.int64)  # writable: same signature as above
        if problem.mask_kind == "bool":
            bmask, kind = mask, MASK_BOOL
        else:
            fmask, kind = mask, MASK_FLOAT
    return fmask, bmask, mask_batch, kind


def _widen(a: np.ndarray) -> np.ndarray:
    """float32 copy of a C-contiguous float16/bfloat16 array (exact; vectorised, unlike NumPy's
    float16 cast)."""
    from ..kernels.half import widen

    out = np.empty(a.shape, dtype=np.float32)
    widen(a.reshape(-1).view(np.uint16), out.reshape(-1), a.dtype == np.float16)
    return out


def _narrow(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 ``x`` rounded to the 16-bit ``dtype`` (nearest even, as NumPy/ml_dtypes)."""
    from ..kernels.half import narrow

    x = np.ascontiguousarray(x)
    bits = np.empty(x.shape, dtype=np.uint16)
    narrow(x.reshape(-1), bits.reshape(-1), dtype == np.float16)
    return bits.view(dtype)


def _as4(a, batch: int) -> np.ndarray:
    """C-contiguous (batch, heads, rows, features) view, or copy, of a host array."""
    a = np.ascontiguousarray(a)
    if a.ndim == 2:  # (L, E): one head, no batch
        return a.reshape((1, 1) + a.shape)
    return a.reshape((batch,) + a.shape[-3:])


#: 16-bit dtypes: computed in float32 (inputs widened once, O(L) next to the O(L^2) kernel), the
#: output and lse rounded to the input dtype once, as the ``reference`` backend does
SIXTEEN_BIT = ("float16", "bfloat16")


class CpuBackend(Backend):
    name = "cpu"
    description = "Numba njit(parallel=True), tiled online softmax, BLAS tiles; memory linear in L"
    dtypes = ("float32", "float64") + SIXTEEN_BIT
    supports_mods = True
    supports_backward = True
    supports_dropout = True
    supports_causal_offset = True
    supports_decode = True
    decode_dtypes = ("float16", "float32", "float64", "bfloat16")
    decode_cache_dtypes = ("float16", "float32", "float64", "bfloat16")
    priority = 10

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.E == 0:
            reasons.append("E = 0 (BLAS cannot take an empty inner dimension)")
        if getattr(problem, "needs_backward", False) and dtype_name(problem.dtype) in SIXTEEN_BIT:
            reasons.append(f"no backward pass for {problem.dtype.name} in this backend (float32 and float64 only)")
        if getattr(problem, "needs_backward", False) and problem.causal_offset:
            reasons.append(
                "no backward pass for a bottom-right causal mask (causal_lower_right with L != S) in this backend"
            )
        return reasons

    def capabilities(self) -> dict:
        from ..gemm_providers import gemm_provider_info

        caps = super().capabilities()
        info = gemm_provider_info()
        providers = info["providers"]
        caps["gemm"] = info
        caps["notes"] = [
            f"tile products ({info['requested']}): "
            + "; ".join(
                f"{dt} {name}" + ("" if " " in name else f" ({providers[name]})") for dt, name in info["in_use"].items()
            )
            + "; choose with ATTENTION_ENGINE_GEMM or engine.set_gemm_provider"
        ]
        return caps

    def run(self, problem: AttentionProblem):
        if dtype_name(problem.dtype) in SIXTEEN_BIT:  # memoised: dtype.name costs microseconds
            return self._run_16bit(problem)
        return self._run(problem)

    def _run_16bit(self, problem: AttentionProblem):
        """A 16-bit problem: through a mixed-precision GEMM on the 16-bit bits where one is chosen
        (``engine.gemm_providers.sixteen_bit_gemm``), else widened to float32 (exact). Either way
        the kernel computes in float32 and the output and lse are rounded once to the input dtype.
        A float mask is widened to float32 (exact, as the reference adds it)."""
        f32 = np.dtype(np.float32)
        mask = problem.attn_mask
        if problem.mask_kind == "float":
            mask = np.asarray(mask).astype(f32)
        half = sixteen_bit_gemm(problem.dtype.name)
        v = _as4(problem.value, problem.batch)
        if half is not None and np.isfinite(np.sum(v, dtype=np.float32)):
            from ..kernels.gemm import GEMM_CBLAS_BF16, GEMM_CBLAS_F16

            bits = tuple(_as4(a, problem.batch).view(np.uint16) for a in (problem.query, problem.key))
            kind = GEMM_CBLAS_BF16 if problem.dtype.name == "bfloat16" else GEMM_CBLAS_F16
            out, lse = self._run(
                dataclasses.replace(problem, attn_mask=mask, dtype=f32),
                arrays=bits + (v.view(np.uint16),),
                gemm=(kind, half.pointer(problem.dtype.name)),
            )
        else:  # widened: O(L) next to the O(L^2) kernel
            q32, k32 = (_widen(_as4(a, problem.batch)) for a in (problem.query, problem.key))
            wide = dataclasses.replace(problem, query=q32, key=k32, value=_widen(v), attn_mask=mask, dtype=f32)
            out, lse = self._run(wide)
        return _narrow(out, problem.dtype), _narrow(lse, problem.dtype)

    def _run(self, problem: AttentionProblem, arrays=None, gemm=None):
        """The kernel call. ``arrays``: ready (batch, heads, rows, features) q, k, v (the 16-bit
        path's uint16 bits; v already checked finite), with ``gemm`` = (kind, address)."""
        # a NaN/inf value in V reaches only the rows that weigh it: the kernel checks each tile's
        # product and recomputes a non-finite one exactly (kernels.nonfinite), so no pass over V here
        B = problem.batch
        if arrays is None:
            arrays = tuple(_as4(a, B) for a in (problem.query, problem.key, problem.value))
        q, k, v = arrays
        Hq, L, S = problem.num_q_heads, problem.L, problem.S
        fmask, bmask, mask_batch, kind = _kernel_masks(problem)
        if gemm is None:
            name = dtype_name(problem.dtype)
            provider = get_gemm_provider(name)
            gemm = (provider.kind, provider.pointer(name))
        # only np.dot's OpenBLAS starts threads of its own; the other providers are sequential
        pin = _get_blas_pin() if gemm[0] == GEMM_NUMPY else None
        block_q, block_k = tile_sizes(L, problem.E, problem.Ev, blas_pinned=pin is None or pin.available)
        # tiles this small never make OpenBLAS start threads: no pin (it costs microseconds)
        small = min(block_q, L) * min(block_k, S) * max(problem.E, problem.Ev) <= BLAS_SINGLE_THREAD_MNK
        if pin is None or small:
            pin = _NO_PIN
        else:
            pin = pin()
        sub_tiles = max(1, CPU_TASK_ROWS // block_q)
        tile_kinds = _ALL_FULL
        if problem.mask_mod is not None:
            tile_kinds = self._tile_kinds(problem, block_q, block_k)
        out = np.empty((B, Hq, L, problem.Ev), dtype=problem.dtype)
        lse = np.empty((B, Hq, L), dtype=problem.dtype)
        serial = B * Hq * L * S * (problem.E + problem.Ev) <= CPU_SERIAL_MAX_WORK
        kernel = _kernels().flash_kernel(problem.score_mod, problem.mask_mod, serial)
        with kernel_call_guard(), pin:
            kernel(
                q,
                k,
                v,
                fmask,
                bmask,
                mask_batch,
                kind,
                problem.is_causal,
                problem.causal_offset,
                problem.scale,
                problem.group,
                block_q,
                block_k,
                sub_tiles,
                problem.mod_args,
                problem.score_mod is not None,
                tile_kinds,
                dropout_args(problem),
                gemm[0],
                gemm[1],
                out,
                lse,
            )
        return out.reshape(problem.out_shape), lse.reshape(problem.lse_shape)

    def decode(self, problem):
        from .cpu_decoding import run_decode

        return run_decode(problem, _get_blas_pin())

    def run_backward(self, problem: AttentionProblem):
        from ..kernels.cpu_flash_bwd import _backward_epilogue, _backward_prologue, backward_kernel

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
        q, k, v, o, do = (
            _as4(a, B) for a in (problem.query, problem.key, problem.value, problem.out, problem.grad_out)
        )
        lse = np.ascontiguousarray(problem.lse, dtype=dt).reshape(B, Hq, L)
        fmask, bmask, mask_batch, kind = _kernel_masks(problem)
        # the forward's provider and tiles: the scores are recomputed with the very same products
        provider = get_gemm_provider(dt.name)
        gemm = (provider.kind, provider.pointer(dt.name))
        pin = _get_blas_pin() if gemm[0] == GEMM_NUMPY else None
        block_q, block_k, fq = backward_tile_sizes(L, S, E, Ev, blas_pinned=pin is None or pin.available)
        nqb, nkb = -(-L // block_q), -(-S // block_k)
        splits = backward_splits(B * H, get_num_threads(), nkb)
        # work per key tile: the query tiles it meets (causal: those at or below the diagonal)
        first = (np.arange(nkb) * block_k // block_q) if problem.is_causal else np.zeros(nkb, np.int64)
        bounds = split_bounds(nqb - first, splits)
        tile_kinds = np.full((1, 1, 1, 1), TILE_FULL, dtype=np.int8)
        if problem.mask_mod is not None:
            tile_kinds = self._tile_kinds(problem, block_q, block_k)
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
        with kernel_call_guard(), _NO_PIN if pin is None else pin():
            kernel(
                qs,
                qst,
                fq,
                k,
                v,
                do,
                lrow,
                delta,
                fmask,
                bmask,
                mask_batch,
                kind,
                problem.is_causal,
                problem.group,
                block_q,
                block_k,
                splits,
                bounds,
                problem.mod_args,
                problem.score_mod is not None,
                tile_kinds,
                dropout_args(problem),
                gemm[0],
                gemm[1],
                dm_rows,
                dm_cols,
                want_dm,
                dq_part,
                dk,
                dv,
                dm,
            )
        _backward_epilogue(dq_part, problem.scale, dq)
        dmask = None
        if want_dm:
            if not dm_cols:  # per key tile -> the mask's one column
                dm = dm.sum(axis=-1, keepdims=True)
            dm = dm.reshape(problem.batch_shape + (Hq,) + dm.shape[-2:]) if problem.query.ndim > 2 else dm[0, 0]
            dmask = reduce_to_shape(dm, mshape).astype(problem.attn_mask.dtype)
        return (dq.reshape(problem.query.shape), dk.reshape(problem.key.shape), dv.reshape(problem.value.shape), dmask)

    @staticmethod
    def _tile_kinds(problem: AttentionProblem, block_q: int, block_k: int) -> np.ndarray:
        """The mask_mod's tile map at the kernel's tile sizes (from the caller's block mask when
        it has them, memoised there; otherwise built for this call)."""
        from ..mods import create_block_mask

        bm = problem.block_mask
        if bm is None:
            bm = create_block_mask(
                problem.mask_mod,
                problem.batch,
                problem.num_q_heads,
                problem.L,
                problem.S,
                mod_args=problem.mod_args,
                block_q=block_q,
                block_k=block_k,
            )
        return bm.kinds_at(block_q, block_k)
