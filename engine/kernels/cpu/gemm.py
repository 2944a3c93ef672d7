"""Tile products for the ``cpu`` kernels: ``c = a @ b`` through the GEMM provider chosen at run time.

Any ``@njit`` kernel calls :func:`tile_gemm` with a provider code and a C function pointer (both
plain integers, chosen by :mod:`engine.runtime.gemm_providers` in Python and passed as kernel arguments).
Because the pointer is an argument rather than a compiled-in constant, one compiled kernel, loaded
from Numba's disk cache, serves every provider, and the choice can change between calls.

Providers (codes below):

* ``GEMM_NUMPY``: ``np.dot``, i.e. Numba's call into SciPy's bundled OpenBLAS. Always available:
  the fallback.
* ``GEMM_CBLAS``: a CBLAS ``?gemm`` (LP64) by pointer: MKL's ``cblas_sgemm``/``cblas_dgemm``
  (sequential layer), or a newer OpenBLAS (``scipy_cblas_sgemm`` of ``scipy-openblas32``), or the
  same signature's mixed-precision ``cblas_gemm_bf16bf16f32``/``cblas_gemm_f16f16f32`` (MKL) for
  16-bit ``a``/``b`` bit patterns with float32 ``c`` (:func:`tile_gemm_16`).

* ``GEMM_CBLAS`` also carries the engine's own product (the ``fma`` provider,
  ``engine.kernels.cpu.fma_gemm``): a Numba ``cfunc`` with ``cblas_sgemm``'s signature.

BLIS and a register-blocked loop in plain Numba were measured too (``bench/tile_gemm.py``) and lost
everywhere measured, so they are not compiled into the kernels (each branch costs compile time).

``a`` and ``b`` may be C-ordered or F-ordered 2-D arrays (an F-ordered one is read as a transposed
operand, no copy); ``c`` is C-ordered and overwritten. A pointer is called without the GIL from
inside parallel tasks, so a provider must be re-entrant and single-threaded (the Python side
guarantees both, or does not offer it).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...runtime.jit_cache import cache_enabled
from .blas import gemm_acc, row_ld

__all__ = [
    "GEMM_NUMPY",
    "GEMM_CBLAS",
    "GEMM_CBLAS_BF16",
    "GEMM_CBLAS_F16",
    "GEMM_AMX_BF16",
    "GEMM_AMX_F16",
    "tile_gemm",
    "tile_gemm_acc",
    "tile_gemm_16",
    "tile_gemm_16_acc",
    "jit_gemm",
    "gemm_probe",
]

_CACHE = cache_enabled()

GEMM_NUMPY, GEMM_CBLAS = 0, 1
#: the kernels' 16-bit path: a mixed-precision CBLAS GEMM, and which format the operands are in
GEMM_CBLAS_BF16, GEMM_CBLAS_F16 = 2, 3
#: the forward's 16-bit path on Intel AMX tiles (``kernels.cpu.amx``): both products by
#: ``amx_gemm``'s address, with the operands the kernel lays out for it
GEMM_AMX_BF16, GEMM_AMX_F16 = 4, 5

#: CBLAS enum values (cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _data_ptr(context, builder, ty, val):
    ary = context.make_array(ty)(context, builder, val)
    return builder.bitcast(ary.data, ir.IntType(8).as_pointer())


@intrinsic
def _cblas_call(typingctx, fn, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """``fn(RowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``: the CBLAS
    ``?gemm`` signature (LP64: every integer a C int; alpha/beta of the scalar type given)."""
    if not (isinstance(alpha, types.Float) and alpha == beta):
        return None
    sig = types.void(fn, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fp = context.get_value_type(alpha)
        vp = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i32, i32, i32, fp, vp, i32, vp, i32, fp, vp, i32])
        f = builder.inttoptr(args[0], fnty.as_pointer())
        as_i32 = lambda x: builder.trunc(x, i32)  # noqa: E731  (Numba ints are 64-bit)
        builder.call(
            f,
            [
                ir.Constant(i32, _ROW_MAJOR),
                as_i32(args[1]),
                as_i32(args[2]),
                as_i32(args[3]),
                as_i32(args[4]),
                as_i32(args[5]),
                args[6],
                _data_ptr(context, builder, signature.args[7], args[7]),
                as_i32(args[8]),
                _data_ptr(context, builder, signature.args[9], args[9]),
                as_i32(args[10]),
                args[11],
                _data_ptr(context, builder, signature.args[12], args[12]),
                as_i32(args[13]),
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def jit_gemm(typingctx, fn, jitter, a, b, c):
    """``fn(jitter, a, b, c)``: a GEMM kernel generated for one fixed shape, layout, alpha and
    beta (MKL's ``mkl_jit_get_?gemm_ptr(jitter)``; see ``engine.runtime.gemm_jit``): no argument
    checks and no dispatch per call. The caller guarantees that the arrays have the shape and
    leading dimensions the kernel was generated for."""
    sig = types.void(fn, jitter, a, b, c)

    def codegen(context, builder, signature, args):
        vp = ir.IntType(8).as_pointer()
        f = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [vp, vp, vp, vp]).as_pointer())
        ptr = lambda i: _data_ptr(context, builder, signature.args[i], args[i])  # noqa: E731
        builder.call(f, [builder.inttoptr(args[1], vp), ptr(2), ptr(3), ptr(4)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_CACHE, inline="always")
def _operand(x):
    """(trans flag, leading dimension) of a 2-D operand in row-major CBLAS terms; (-1, 0) when its
    layout is neither (a row-major matrix nor the transpose of one)."""
    isz = x.itemsize
    if x.shape[1] <= 1 or x.strides[1] == isz:
        return _NO_TRANS, max(x.strides[0] // isz, x.shape[1], 1)
    if x.shape[0] <= 1 or x.strides[0] == isz:
        return _TRANS, max(x.strides[1] // isz, x.shape[0], 1)
    return -1, 0


def _blas_layout(x):
    """``x`` itself when its type is C- or F-ordered, else a C-ordered copy (in Python: ``x``)."""
    return x


@overload(_blas_layout, inline="always")
def _blas_layout_overload(x):
    # Numba's np.dot copies an operand of layout 'A' anyway, with a NumbaPerformanceWarning at
    # compile time (misnamed "np.vdot() is faster on contiguous arrays"); the copy is made here
    # explicitly instead, so the fallback path below compiles without a warning
    if isinstance(x, types.Array) and x.layout not in "CF":
        return lambda x: np.ascontiguousarray(x)
    return lambda x: x


@njit(cache=_CACHE)
def tile_gemm(kind, fn, a, b, c):
    """``c = a @ b`` (``a`` (m, k), ``b`` (k, n), ``c`` (m, n) C-ordered, one float dtype) with
    provider ``kind`` (a ``GEMM_*`` code) and its C function ``fn`` (an address; 0 for
    ``GEMM_NUMPY``). An operand in neither row- nor column-major layout, or an empty dimension,
    goes to ``np.dot`` (an operand whose type is neither C- nor F-ordered is copied first).
    """
    m, kk = a.shape
    n = b.shape[1]
    if kind == GEMM_CBLAS:
        ta, lda = _operand(a)
        tb, ldb = _operand(b)
        if ta >= 0 and tb >= 0 and kk > 0 and m > 0 and n > 0:
            _cblas_call(
                fn, ta, tb, m, n, kk, c.dtype.type(1), a, lda, b, ldb, c.dtype.type(0), c, row_ld(c, c.itemsize)
            )
            return
    np.dot(_blas_layout(a), _blas_layout(b), c)


@njit(cache=_CACHE)
def tile_gemm_acc(kind, fn, a, b, c):
    """``c += a @ b``, as :func:`tile_gemm` (beta = 1: the product is added in the GEMM's own
    write-back, no temporary); ``b`` must be row-major for ``GEMM_NUMPY``."""
    m, kk = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or kk == 0:
        return
    ta, lda = _operand(a)
    if kind == GEMM_CBLAS:
        tb, ldb = _operand(b)
        if ta >= 0 and tb >= 0:
            one = c.dtype.type(1)
            _cblas_call(fn, ta, tb, m, n, kk, one, a, lda, b, ldb, one, c, row_ld(c, c.itemsize))
            return
    if ta == _TRANS:
        gemm_acc(a.T, b, c, True)
    else:
        gemm_acc(a, b, c, False)


@njit(cache=_CACHE)
def tile_gemm_16(fn, a, b, c):
    """``c = a @ b`` for 16-bit operands given as uint16 bit patterns (bfloat16 or float16) and a
    float32 ``c``, with a CBLAS-signature mixed-precision GEMM ``fn`` (MKL's
    ``cblas_gemm_bf16bf16f32`` or ``cblas_gemm_f16f16f32``; they accumulate in float32). Operands
    must be row- or column-major (the kernels only pass such views)."""
    _gemm_16(fn, a, b, c, np.float32(0.0))


@njit(cache=_CACHE)
def tile_gemm_16_acc(fn, a, b, c):
    """``c += a @ b`` as :func:`tile_gemm_16` (beta = 1)."""
    _gemm_16(fn, a, b, c, np.float32(1.0))


@njit(cache=_CACHE, inline="always")
def _gemm_16(fn, a, b, c, beta):
    m, kk = a.shape
    n = b.shape[1]
    ta, lda = _operand(a)
    tb, ldb = _operand(b)
    _cblas_call(fn, ta, tb, m, n, kk, np.float32(1.0), a, lda, b, ldb, beta, c, row_ld(c, c.itemsize))


@njit(cache=_CACHE)
def gemm_probe(kind, fn, a, b, c, reps):
    """``reps`` calls of :func:`tile_gemm` in one compiled loop (the provider calibration times it)."""
    for _ in range(reps):
        tile_gemm(kind, fn, a, b, c)
