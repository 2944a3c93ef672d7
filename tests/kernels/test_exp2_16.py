"""The 16-bit forward's softmax pass computes its exponentials in base 2 (``softmax_tile.exp2_16``,
the pass's scale and shift times log2(e)): the contract of ``exp2_16`` and the pass's results
against float64."""

import ml_dtypes
import numpy as np
from numba import njit

from engine.kernels.cpu.softmax_tile import exp2_16, exp_tile_bf16, exp_tile_f16

TINY = np.finfo(np.float32).tiny


@njit
def _exp2_array(t, out):
    for i in range(t.shape[0]):
        out[i] = exp2_16(t[i])


def test_exp2_16_contract():
    t = np.concatenate([np.linspace(-127, 12, 200_001), [-np.inf, np.nan, -126.6, -126.4, -300.0]]).astype(np.float32)
    out = np.empty_like(t)
    _exp2_array(t, out)
    exact = np.exp2(t.astype(np.float64))
    normal = exact >= TINY
    assert np.max(np.abs(out[normal] - exact[normal]) / exact[normal]) < 3e-7
    below = ~normal & np.isfinite(t)
    assert np.all((out[below] == 0) | (np.abs(out[below] - exact[below]) < TINY))
    assert out[-5] == 0 and np.isnan(out[-4]) and out[-1] == 0


def test_16bit_pass_matches_float64(rng):
    nk, nq, scale = 67, 45, np.float32(0.3)
    st = (rng.standard_normal((nk, nq)) * 6).astype(np.float32)
    st[3, :5] = -np.inf  # masked scores
    # the 16-bit passes take each row's shift unscaled (a score) and compute (st - shift) * scale
    shift = (np.max(st, axis=0) - rng.random(nq) * 4 / scale).astype(np.float32)
    exact = np.exp((st.astype(np.float64) - shift.astype(np.float64)) * float(scale))
    for fn, fmt in ((exp_tile_bf16, ml_dtypes.bfloat16), (exp_tile_f16, np.float16)):
        pt = np.empty((nk, nq), np.uint16)
        ts, tc, tmx = np.empty(nq), np.empty(nq, np.float32), np.empty(nq, np.float32)
        fn(st, pt, scale, shift, ts, tc, tmx)
        np.testing.assert_allclose(ts, exact.sum(axis=0), rtol=2e-6)
        np.testing.assert_array_equal(tmx, st.max(axis=0))
        got = pt.view(fmt).astype(np.float64)
        want = exact.astype(np.float32).astype(fmt).astype(np.float64)  # rounded once
        ulp = np.abs(want) * (2.0**-7 if fmt is ml_dtypes.bfloat16 else 2.0**-10)
        assert np.all(np.abs(got - want) <= ulp + 1e-30)  # at most one unit in the last place
        assert np.mean(got != want) < 0.01
        assert np.all(got[3, :5] == 0)
