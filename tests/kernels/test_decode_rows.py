"""The decode step's register-resident row passes (``engine.kernels.cpu.decode_rows``) against
NumPy: every head width they take, rows read at a stride (a cache longer than the keys), weights of
0 that must leave a NaN or inf value out, NaN and inf weights and scores, and the cases they leave
to the kernel's loops (another dtype or width: False, nothing written)."""

import numpy as np
import pytest
from numba import njit

from engine.kernels.cpu.decode_rows import WIDEST, row_scores, row_values


@njit
def _scores(qt, keys, j0, nk, sc, D):
    return row_scores(qt, keys, j0, nk, sc, D)


@njit
def _values(ac, sc, values, j0, nk, Dv):
    return row_values(ac, sc, values, j0, nk, Dv)


@pytest.mark.parametrize("D", [16, 32, 48, 64, 80, 96, 112, 128])
def test_scores_and_values_match_numpy(D, rng):
    if D > WIDEST:
        pytest.skip(f"heads wider than {WIDEST} are left to the loops on a CPU without AVX-512")
    S, j0, nk = 40, 3, 29
    qt = rng.standard_normal((1, D)).astype(np.float32)
    keys = rng.standard_normal((S, D)).astype(np.float32)
    sc = np.full((1, 32), np.nan, np.float32)
    assert _scores(qt, keys, j0, nk, sc, D)
    want = keys[j0 : j0 + nk].astype(np.float64) @ qt[0].astype(np.float64)
    np.testing.assert_allclose(sc[0, :nk], want, rtol=1e-5, atol=1e-5 * np.sqrt(D))
    assert np.isnan(sc[0, nk:]).all()  # nothing past nk
    values = rng.standard_normal((S, D)).astype(np.float32)
    w = rng.random((1, 32)).astype(np.float32)
    acc = rng.standard_normal((1, D)).astype(np.float32)
    start = acc.copy()
    assert _values(acc, w, values, j0, nk, D)
    want = start[0] + w[0, :nk].astype(np.float64) @ values[j0 : j0 + nk].astype(np.float64)
    np.testing.assert_allclose(acc[0], want, rtol=1e-5, atol=1e-5)


def test_a_weight_of_zero_leaves_its_nan_or_inf_row_out(rng):
    D, S = 64, 12
    values = rng.standard_normal((S, D)).astype(np.float32)
    values[2, 5] = np.nan
    values[7, 9] = np.inf
    w = rng.random((1, S)).astype(np.float32)
    w[0, 2] = w[0, 7] = 0.0
    acc = np.zeros((1, D), np.float32)
    assert _values(acc, w, values, 0, S, D)
    assert np.isfinite(acc).all()
    np.testing.assert_allclose(acc[0], w[0] @ np.where(np.isfinite(values), values, 0), rtol=1e-5, atol=1e-5)
    w[0, 7] = 0.5  # weighed: the inf reaches its column only; a NaN weight makes every column NaN
    acc[:] = 0
    _values(acc, w, values, 0, S, D)
    assert np.isinf(acc[0, 9]) and np.isfinite(np.delete(acc[0], 9)).all()
    w[0, 3] = np.nan
    acc[:] = 0
    _values(acc, w, values, 0, S, D)
    assert np.isnan(acc).all()


def test_nan_and_inf_scores_come_through():
    D = 32
    qt = np.ones((1, D), np.float32)
    keys = np.ones((3, D), np.float32)
    keys[1, 0] = np.nan
    keys[2, 4] = np.inf
    sc = np.zeros((1, 3), np.float32)
    assert _scores(qt, keys, 0, 3, sc, D)
    assert sc[0, 0] == D and np.isnan(sc[0, 1]) and sc[0, 2] == np.inf


def test_other_dtypes_and_widths_are_left_to_the_loops(rng):
    for dt, D in ((np.float64, 64), (np.float32, 24), (np.float32, 144), (np.float32, 8), (np.float32, WIDEST + 16)):
        qt = np.ones((1, D), dt)
        keys = np.ones((4, D), dt)
        sc = np.full((1, 4), 7, dt)
        acc = np.full((1, D), 7, dt)
        assert not _scores(qt, keys, 0, 4, sc, D) and (sc == 7).all()
        assert not _values(acc, sc, keys, 0, 4, D) and (acc == 7).all()


def test_no_rows_change_nothing():
    qt = np.ones((1, 64), np.float32)
    sc = np.full((1, 4), 7, np.float32)
    acc = np.full((1, 64), 3, np.float32)
    assert _scores(qt, qt, 0, 0, sc, 64) and (sc == 7).all()
    assert _values(acc, sc, qt, 0, 0, 64) and (acc == 3).all()


_AVX2_CHILD = """
import numpy as np
from numba import njit
from engine.kernels.cpu.decode_rows import WIDEST, row_scores, row_values
assert WIDEST == 64, WIDEST

@njit
def both(qt, keys, sc, acc, D):
    return row_scores(qt, keys, 0, keys.shape[0], sc, D), row_values(acc, sc, keys, 0, keys.shape[0], D)

rng = np.random.default_rng(0)
for D in (16, 64, 128):
    qt = rng.standard_normal((1, D)).astype(np.float32)
    keys = rng.standard_normal((9, D)).astype(np.float32)
    sc, acc = np.zeros((1, 9), np.float32), np.zeros((1, D), np.float32)
    assert both(qt, keys, sc, acc, D) == ((D <= 64),) * 2, D
    if D <= 64:
        np.testing.assert_allclose(sc[0], keys @ qt[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(acc[0], sc[0] @ keys, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_an_avx2_target_keeps_heads_up_to_64(tmp_path):
    """Compiled for Haswell (AVX2, 16 ymm registers; NUMBA_CPU_NAME, as on AMD Zen 3): the passes
    take heads up to 64 and give the same sums; 128 is left to the loops (16 ymm accumulators)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+sse4.2,+popcnt")
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _AVX2_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr[-3000:]
