"""GEMM kernels generated for the ``cpu`` forward kernel's two tile products at one tile shape.

MKL can generate a GEMM for one fixed shape, layout, alpha and beta (``mkl_jit_create_sgemm`` /
``mkl_jit_create_dgemm``): the call then goes straight to code made for it, without the argument
checks, the choice of code path and the packing decisions every ``cblas_?gemm`` call makes. At the
kernel's tile shapes on an AVX-512 Xeon that took the products from 150-190 to 190-210 GFLOP/s
(float32, one thread; ``bench/tile_gemm.py``). The kernel calls them for full tiles only (the last
key or query tile of a sequence may be shorter: those take ``cblas_?gemm``).

The two products, in row-major terms (``block_k`` x ``block_q`` tiles, head sizes ``E``/``Ev``):

* scores ``st (block_k, block_q) = kt (block_k, E) @ q_tile.T``, ``q_tile (block_q, E)`` read
  transposed, beta 0;
* values ``acc (block_q, Ev) += pt.T @ vt (block_k, Ev)``, ``pt (block_k, block_q)`` read
  transposed, beta 1 (accumulated in the GEMM's write-back).

Kernels are made once per process per (dtype, shape) and kept for its lifetime (a handful of
small objects). Where MKL does not generate code for a shape (it answers ``MKL_NO_JIT`` and would
run its ordinary GEMM), none is used.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["JitPair", "NO_JIT", "tile_jit_kernels"]

#: CBLAS enums (mkl_cblas.h) and mkl_jit_create_?gemm's answers (mkl_blas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_JIT_SUCCESS = 0


class JitPair(tuple):
    """(scores function, scores handle, values function, values handle): addresses, 0 for none."""

    __slots__ = ()


NO_JIT = JitPair((0, 0, 0, 0))

_lock = threading.Lock()
_made: dict = {}  # (dtype name, transposes, m, n, k, lda, ldb, ldc, beta) -> (function, handle) or None


def _create(
    lib, dtype_name: str, trans_a: int, trans_b: int, m: int, n: int, k: int, lda: int, ldb: int, ldc: int, beta: float
):
    """One generated kernel as (function address, jitter address), or None."""
    key = (dtype_name, trans_a, trans_b, m, n, k, lda, ldb, ldc, beta)
    if key in _made:
        return _made[key]
    kind = "s" if dtype_name == "float32" else "d"
    scalar = ctypes.c_float if kind == "s" else ctypes.c_double
    create = getattr(lib, f"mkl_cblas_jit_create_{kind}gemm")
    create.restype = ctypes.c_int
    get = getattr(lib, f"mkl_jit_get_{kind}gemm_ptr")
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.c_void_p]
    jitter = ctypes.c_void_p()
    ints = [ctypes.c_int(x) for x in (_ROW_MAJOR, trans_a, trans_b, m, n, k)]
    lds = [ctypes.c_int(x) for x in (lda, ldb)]
    status = create(ctypes.byref(jitter), *ints, scalar(1.0), *lds, scalar(beta), ctypes.c_int(ldc))
    made = None
    if status == _JIT_SUCCESS and jitter.value:
        fn = get(jitter)
        if fn:
            made = (fn, jitter.value)
    _made[key] = made
    return made


def tile_jit_kernels(provider, dtype_name: str, block_q: int, block_k: int, E: int, Ev: int) -> JitPair:
    """The generated kernels of both products at these tiles, or :data:`NO_JIT` (a provider other
    than MKL, a dtype other than float32/float64, an MKL without the JIT API, or a shape it does not
    generate code for)."""
    if getattr(provider, "name", None) != "mkl" or dtype_name not in ("float32", "float64") or not provider.libraries:
        return NO_JIT
    lib = provider.libraries[0]
    if not hasattr(lib, "mkl_cblas_jit_create_sgemm"):
        return NO_JIT
    with _lock:
        scores = _create(lib, dtype_name, _NO_TRANS, _TRANS, block_k, block_q, E, E, E, block_q, 0.0)
        values = _create(lib, dtype_name, _TRANS, _NO_TRANS, block_q, Ev, block_k, block_q, Ev, Ev, 1.0)
    if scores is None or values is None:
        return NO_JIT
    return JitPair(scores + values)
