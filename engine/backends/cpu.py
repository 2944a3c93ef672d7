"""The ``cpu`` backend: validation done, this wrapper lays out arrays and calls the Numba kernel."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading

import numpy as np

from ..config import BLAS_SINGLE_THREAD_MNK, CPU_BIG_BLOCK_Q, CPU_BLOCK_K, CPU_BLOCK_Q, CPU_TASK_ROWS
from ..gemm_providers import get_gemm_provider, sixteen_bit_gemm
from ..kernels.gemm import GEMM_NUMPY
from ..kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE, TILE_FULL
from ..masks import kernel_mask
from ..materialised import add_nonfinite_values
from ..threads import kernel_call_guard
from ..validation import AttentionProblem
from .base import Backend

__all__ = ["CpuBackend", "tile_sizes"]


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

    @contextlib.contextmanager
    def __call__(self):
        if not self.available:
            yield
            return
        with self._lock:
            if self._users == 0:
                self._saved = self._get()
                if self._saved != 1:
                    self._set(1)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved not in (None, 1):
                    self._set(self._saved)


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
    priority = 10

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        if problem.E == 0:
            reasons.append("E = 0 (BLAS cannot take an empty inner dimension)")
        return reasons

    def capabilities(self) -> dict:
        from ..gemm_providers import gemm_provider_info

        caps = super().capabilities()
        info = gemm_provider_info()
        providers = info["providers"]
        caps["gemm"] = info
        caps["notes"] = [f"tile products ({info['requested']}): " + "; ".join(
            f"{dt} {name}" + ("" if " " in name else f" ({providers[name]})") for dt, name in info["in_use"].items())
            + "; choose with ATTENTION_ENGINE_GEMM or engine.set_gemm_provider"]
        return caps

    def run(self, problem: AttentionProblem):
        if problem.dtype.name in SIXTEEN_BIT:
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
            out, lse = self._run(dataclasses.replace(problem, attn_mask=mask, dtype=f32),
                                 arrays=bits + (v.view(np.uint16),),
                                 gemm=(kind, half.pointer(problem.dtype.name)))
        else:  # widened: O(L) next to the O(L^2) kernel
            q32, k32 = (_widen(_as4(a, problem.batch)) for a in (problem.query, problem.key))
            wide = dataclasses.replace(problem, query=q32, key=k32, value=_widen(v), attn_mask=mask, dtype=f32)
            out, lse = self._run(wide)
        return _narrow(out, problem.dtype), _narrow(lse, problem.dtype)

    def _run(self, problem: AttentionProblem, arrays=None, gemm=None):
        """The kernel call. ``arrays``: ready (batch, heads, rows, features) q, k, v (the 16-bit
        path's uint16 bits; v already checked finite), with ``gemm`` = (kind, address)."""
        from ..kernels.cpu_flash_fwd import flash_kernel

        if arrays is None:
            arrays = tuple(_as4(a, problem.batch) for a in (problem.query, problem.key, problem.value))
        q, k, v = arrays
        # a NaN/inf value would leak through 0 * NaN into rows that do not attend to it: compute
        # with it zeroed, then add it back to exactly the rows whose weight is > 0. The sum is a
        # cheap screen: a non-finite total only costs the slower exact path
        nonfinite_v = v.dtype.kind == "f" and not np.isfinite(np.sum(v))
        if nonfinite_v:
            v = np.where(np.isfinite(v), v, 0).astype(problem.dtype)
        B, Hq, L, S = problem.batch, problem.num_q_heads, problem.L, problem.S
        # both mask slots are always filled (a zero-stride dummy for the unused one), so the
        # kernel compiles once per dtype instead of once per mask kind
        fmask = np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=problem.dtype), (1, Hq, L, S))
        bmask = np.broadcast_to(np.ones((1, 1, 1, 1), dtype=np.bool_), (1, Hq, L, S))
        mask_batch = np.zeros(B, dtype=np.int64)
        kind = MASK_NONE
        if problem.attn_mask is not None:
            mask, mask_batch = kernel_mask(problem)
            mask_batch = np.array(mask_batch, dtype=np.int64)  # writable: same signature as above
            if problem.mask_kind == "bool":
                bmask, kind = mask, MASK_BOOL
            else:
                fmask, kind = mask, MASK_FLOAT
        if gemm is None:
            provider = get_gemm_provider(problem.dtype.name)
            gemm = (provider.kind, provider.pointer(problem.dtype.name))
        # only np.dot's OpenBLAS starts threads of its own; the other providers are sequential
        pin = _get_blas_pin() if gemm[0] == GEMM_NUMPY else None
        block_q, block_k = tile_sizes(L, problem.E, problem.Ev, blas_pinned=pin is None or pin.available)
        sub_tiles = max(1, CPU_TASK_ROWS // block_q)
        tile_kinds = np.full((1, 1, 1, 1), TILE_FULL, dtype=np.int8)
        if problem.mask_mod is not None:
            tile_kinds = self._tile_kinds(problem, block_q, block_k)
        out = np.empty((B, Hq, L, problem.Ev), dtype=problem.dtype)
        lse = np.empty((B, Hq, L), dtype=problem.dtype)
        kernel = flash_kernel(problem.score_mod, problem.mask_mod)
        with kernel_call_guard(), (pin() if pin is not None else contextlib.nullcontext()):
            kernel(q, k, v, fmask, bmask, mask_batch, kind, problem.is_causal, problem.scale, problem.group,
                   block_q, block_k, sub_tiles, problem.mod_args, problem.score_mod is not None, tile_kinds,
                   gemm[0], gemm[1], out, lse)
        out, lse = out.reshape(problem.out_shape), lse.reshape(problem.lse_shape)
        if nonfinite_v:
            out = add_nonfinite_values(problem, out, lse)
        return out, lse

    @staticmethod
    def _tile_kinds(problem: AttentionProblem, block_q: int, block_k: int) -> np.ndarray:
        """The mask_mod's tile map at the kernel's tile sizes (from the caller's block mask when
        it has them, memoised there; otherwise built for this call)."""
        from ..mods import create_block_mask

        bm = problem.block_mask
        if bm is None:
            bm = create_block_mask(problem.mask_mod, problem.batch, problem.num_q_heads, problem.L,
                                   problem.S, mod_args=problem.mod_args, block_q=block_q, block_k=block_k)
        return bm.kinds_at(block_q, block_k)
