"""The engine's own tile product (``engine.kernels.cpu.fma_gemm``): CBLAS ``?gemm``'s contract,
called by address as the kernels call it, and the ``fma`` provider through the backward."""

import ctypes

import numpy as np
import pytest

import engine
from engine.kernels.cpu import fma_gemm as own
from engine.runtime.gemm_providers import load_provider

pytestmark = pytest.mark.skipif(not own.fma_ready(), reason="the CPU Numba compiles for has no FMA")

_ROW, _COL, _N, _T = 101, 102, 111, 112


def _call(dtype, layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    scalar = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    i, p = ctypes.c_int, ctypes.c_void_p
    fn = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, scalar, p, i, p, i, scalar, p, i)(own.fma_gemm(np.dtype(dtype).name))
    fn(layout, ta, tb, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, beta, c.ctypes.data, ldc)


# sizes across the block's rows (6) and columns (32 or 64 float32, 16 or 32 float64), and edges
# and K across the panel's 512 rows (own.KC); blocks of 1, 2 and 3 whole vectors of columns
SIZES = [(1, 1, 1), (5, 7, 3), (6, 64, 64), (7, 65, 9), (13, 130, 37), (64, 80, 256), (3, 1, 5), (12, 33, 0)]
SIZES += [(7, 70, 1100), (9, 48, 20), (5, 32, 11), (6, 16, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", [_ROW, _COL])
def test_every_transpose_alpha_beta_and_size(dtype, layout, rng):
    """C = alpha op(A) op(B) + beta C against float64 NumPy, on sub-matrices of larger arrays
    (leading dimensions above the minimum); beta = 0 does not read C (NaN there stays out)."""
    order = "C" if layout == _ROW else "F"
    for m, n, k in SIZES:
        for ta in (_N, _T):
            for tb in (_N, _T):
                for alpha, beta in ((1.0, 0.0), (1.0, 1.0), (-0.5, 2.0), (2.0, 0.0)):
                    ash = (k, m) if ta == _T else (m, k)
                    bsh = (n, k) if tb == _T else (k, n)
                    # 3 spare rows/columns: the leading dimension is larger than the matrix
                    big_a = np.asarray(rng.standard_normal((ash[0] + 3, ash[1] + 3)), dtype, order=order)
                    big_b = np.asarray(rng.standard_normal((bsh[0] + 3, bsh[1] + 3)), dtype, order=order)
                    big_c = np.asarray(rng.standard_normal((m + 3, n + 3)), dtype, order=order)
                    if beta == 0.0:
                        big_c[:m, :n] = np.nan
                    before = big_c.copy()
                    a, b = big_a[: ash[0], : ash[1]], big_b[: bsh[0], : bsh[1]]
                    opa = a.T if ta == _T else a
                    opb = b.T if tb == _T else b
                    want = alpha * (opa.astype(np.float64) @ opb.astype(np.float64))
                    if beta != 0.0:
                        want += beta * before[:m, :n].astype(np.float64)
                    ld = (lambda x: x.shape[1] + 3) if layout == _ROW else (lambda x: x.shape[0] + 3)
                    _call(dtype, layout, ta, tb, m, n, k, alpha, big_a, ld(a), big_b, ld(b), beta, big_c, ld(big_c) - 3)
                    tol = (2e-5 if dtype == np.float32 else 1e-13) * max(1, k) * 3
                    what = f"{m}x{n}x{k} ta {ta} tb {tb} alpha {alpha} beta {beta}"
                    np.testing.assert_allclose(big_c[:m, :n], want, rtol=0, atol=tol, err_msg=what)
                    # nothing outside C's m x n written
                    outside = np.ones(big_c.shape, bool)
                    outside[:m, :n] = False
                    assert np.array_equal(big_c[outside], before[outside]), what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alpha_zero_reads_neither_operand(dtype):
    """BLAS's rule: alpha = 0 gives beta C without reading A or B (an inf there stays out), and
    beta = 1 keeps C's bits (-0.0 too)."""
    a = np.array([[np.inf, np.nan]], dtype)
    b = np.ones((2, 3), dtype)
    c = np.array([[5.0, -0.0, np.inf]], dtype)
    _call(dtype, _ROW, _N, _N, 1, 3, 2, 0.0, a, 2, b, 3, 1.0, c, 3)
    assert np.array_equal(c, [[5.0, -0.0, np.inf]]) and np.signbit(c[0, 1])
    _call(dtype, _ROW, _N, _N, 1, 3, 2, 0.0, a, 2, b, 3, 0.5, c, 3)
    assert np.array_equal(c, [[2.5, -0.0, np.inf]])
    _call(dtype, _ROW, _N, _N, 1, 3, 2, 0.0, a, 2, b, 3, 0.0, c, 3)
    assert np.array_equal(c, np.zeros((1, 3)))


def test_empty_sizes_write_nothing(rng):
    c = rng.standard_normal((4, 4)).astype(np.float32)
    before = c.copy()
    a = np.ones((4, 4), np.float32)
    for m, n in ((0, 4), (4, 0), (-1, 4)):
        _call(np.float32, _ROW, _N, _N, m, n, 4, 1.0, a, 4, a, 4, 0.0, c, 4)
    assert np.array_equal(c, before)


def test_provider_lists_and_loads():
    p = load_provider("fma")
    assert not isinstance(p, str), p
    assert p.supports("float32") and p.supports("float64") and not p.supports("bfloat16")
    assert p.pointer("float32") == own.fma_gemm("float32") != 0
    assert f"{own.lanes('float32') * 32}-bit" in p.version
    assert own.fma_gemm("bfloat16") == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_through_the_fma_provider(dtype, rng):
    """The backward's products (every layout it passes) through ``fma`` match ``reference``'s."""
    engine.set_gemm_provider("fma")
    try:
        q, k, v = (rng.standard_normal((1, 2, n, 24)).astype(dtype) for n in (150, 291, 291))
        g = rng.standard_normal((1, 2, 150, 24)).astype(dtype)
        for kw in ({}, {"is_causal": True}):
            got = {}
            for backend in ("cpu", "reference"):
                out, lse = engine.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kw)
                got[backend] = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, backend=backend, **kw)
            tol = 2e-4 if dtype == np.float32 else 1e-10
            for name, mine, theirs in zip(("dq", "dk", "dv"), got["cpu"][:3], got["reference"][:3]):
                np.testing.assert_allclose(mine, theirs, rtol=0, atol=tol, err_msg=f"{name} {kw}")
    finally:
        engine.set_gemm_provider(None)


_AVX2_CHECK = """
import ctypes, numpy as np
from engine.kernels.cpu import fma_gemm as own
assert own.lanes("float32") == 8, own.lanes("float32")
rng = np.random.default_rng(0)
for dt, tol in ((np.float32, 1e-3), (np.float64, 1e-10)):
    scalar = ctypes.c_float if dt == np.float32 else ctypes.c_double
    i, p = ctypes.c_int, ctypes.c_void_p
    fn = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, scalar, p, i, p, i, scalar, p, i)(own.fma_gemm(np.dtype(dt).name))
    for m, n, k in ((13, 130, 37), (6, 16, 64), (256, 64, 64)):
        for ta in (111, 112):
            for tb in (111, 112):
                a = rng.standard_normal((k, m) if ta == 112 else (m, k)).astype(dt)
                b = rng.standard_normal((n, k) if tb == 112 else (k, n)).astype(dt)
                c = rng.standard_normal((m, n)).astype(dt)
                want = 0.5 * ((a.T if ta == 112 else a) @ (b.T if tb == 112 else b)) + 2.0 * c
                fn(101, ta, tb, m, n, k, 0.5, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 2.0,
                   c.ctypes.data, n)
                assert np.abs(c - want).max() < tol * k, (dt, m, n, k, ta, tb)
print("ok")
"""


def test_the_256_bit_build(tmp_path):
    """The product as compiled for a CPU without AVX-512 (Zen 3's 256-bit registers, 6 x 2
    blocks), through Numba's target CPU settings: on an AVX-512 CPU the rest of the suite runs
    only the 512-bit build."""
    import os
    import subprocess
    import sys

    features = "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt"
    features += ",+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave"
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
