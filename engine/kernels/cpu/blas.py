"""``C += op(A) @ B`` inside kernels: BLAS's GEMM with beta = 1.

``np.dot`` in Numba always overwrites its output, so accumulating a product costs a temporary and
an extra pass over it. This calls the GEMM that ``np.dot`` itself calls (Numba's ``numba_xxgemm``
helper over SciPy's BLAS, an external symbol, so kernels using it stay disk-cacheable) with
beta = 1. Arrays are 2-D with unit stride along the last axis (any row stride).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload
from numba.np.linalg import _BLAS, get_blas_kind

__all__ = ["gemm_acc", "gemm_acc_kernel", "row_ld"]

_NO, _YES = ord("n"), ord("t")


def gemm_acc(a, b, c, trans_a):
    """``c += (a.T if trans_a else a) @ b`` (float32 or float64; NumPy here, BLAS in kernels)."""
    c += (a.T if trans_a else a) @ b


@njit(inline="always")
def row_ld(x, item):
    """The leading dimension BLAS is given for the C-order rows of ``x``: its row stride, or, for a
    single row, whose stride can be anything (a column of a transposed view has the item's), the
    row's length (BLAS rejects a leading dimension below it: OpenBLAS's "parameter number 10 had
    an illegal value", and the product is not computed)."""
    return max(x.strides[0] // item, x.shape[1], 1) if x.shape[0] <= 1 else x.strides[0] // item


@overload(gemm_acc, target="cpu")
def _gemm_acc_overload(a, b, c, trans_a):
    if not all(isinstance(x, types.Array) and x.ndim == 2 for x in (a, b, c)):
        return None
    if not (a.dtype == b.dtype == c.dtype and a.dtype in (types.float32, types.float64)):
        return None
    xxgemm = _BLAS().numba_xxgemm(a.dtype)
    kind = ord(get_blas_kind(a.dtype))
    dt = np.float32 if a.dtype == types.float32 else np.float64

    def impl(a, b, c, trans_a):
        # column-major BLAS sees each C-order array transposed: C^T += B^T @ op(A)^T
        k, n = b.shape
        m = c.shape[0]
        if m == 0 or n == 0 or k == 0:
            return
        item = c.itemsize
        ones = np.ones(2, dtype=dt)  # alpha = beta = 1
        xxgemm(
            kind,
            _NO,
            _YES if trans_a else _NO,
            n,
            m,
            k,
            ones[0:].ctypes,
            b.ctypes,
            row_ld(b, item),
            a.ctypes,
            row_ld(a, item),
            ones[1:].ctypes,
            c.ctypes,
            row_ld(c, item),
        )

    return impl


@njit
def gemm_acc_kernel(a, b, c, trans_a):
    """:func:`gemm_acc` compiled (the tested entry point)."""
    gemm_acc(a, b, c, trans_a)
