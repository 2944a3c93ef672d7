"""The error contract of ``engine.kernels.fastexp`` over its whole input range (x <= 0)."""

import numpy as np
import pytest

from engine.kernels.fastexp import exp_array

# (dtype, relative error bound where e^x is normal, smallest normal, x below which e^x underflows)
CONTRACT = {
    np.float32: (2.5e-7, np.finfo(np.float32).tiny, -87.34),
    np.float64: (1e-15, np.finfo(np.float64).tiny, -708.4),
}


def _exp(x):
    out = np.empty_like(x)
    exp_array(x, out)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relative_error_bound_over_full_range(dtype):
    bound, tiny, _ = CONTRACT[dtype]
    # dense over the whole representable non-positive range, plus every reduction boundary
    x = np.concatenate(
        [
            -np.logspace(-30, np.log10(-np.log(tiny) * 1.2), 400_000),
            -np.arange(0, 800) * np.log(2) / 2,  # multiples of ln2/2: where n jumps
            np.array([0.0, -0.0, -1e-45 if dtype == np.float32 else -5e-324]),
        ]
    ).astype(dtype)
    got = _exp(x).astype(np.float64)
    exact = np.exp(x.astype(np.float64))  # float64 reference of the same float inputs
    if dtype == np.float64:  # compare float64 against a long-double reference
        exact = np.exp(x.astype(np.longdouble))
    normal = exact >= tiny
    rel = np.abs((got[normal] - exact[normal]) / exact[normal])
    assert rel.max() < bound, f"max relative error {float(rel.max()):.3g} >= {bound}"
    # below the normal range the result is either the true tiny value's neighbourhood or exactly 0
    sub = ~normal
    assert np.all((got[sub] == 0.0) | (np.abs(got[sub] - exact[sub]) <= tiny))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_and_very_negative_give_exact_zero(dtype):
    _, _, cut = CONTRACT[dtype]
    x = np.array([-np.inf, cut - 1e-3, cut * 2, -1e4, -1e30, np.finfo(dtype).min], dtype=dtype)
    got = _exp(x)
    assert np.all(got == 0.0) and not np.any(np.signbit(got))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_stays_nan(dtype):
    x = np.array([np.nan, -1.0, np.nan, -np.inf], dtype=dtype)
    got = _exp(x)
    assert np.isnan(got[0]) and np.isnan(got[2])
    assert got[1] == pytest.approx(np.exp(-1.0), rel=CONTRACT[dtype][0])
    assert got[3] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_gives_exactly_one_and_result_keeps_dtype(dtype):
    got = _exp(np.zeros(33, dtype=dtype))
    assert got.dtype == dtype
    assert np.all(got == 1.0)


def test_fast_tanh_error_bound_in_kernels():
    """fast_tanh inside njit against float64 tanh, over small, medium, huge, signed and NaN inputs."""
    import math

    from numba import njit

    from engine.kernels.fastexp import fast_tanh

    @njit
    def tanh_all(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_tanh(x[i])

    grid = np.concatenate(
        [
            np.linspace(-0.3, 0.3, 20001),
            np.linspace(-30, 30, 200001),
            [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf],
        ]
    )
    for dtype, bound in ((np.float32, 1e-6), (np.float64, 1e-14)):
        x = grid.astype(dtype)
        out = np.empty_like(x)
        tanh_all(x, out)
        exact = np.tanh(x.astype(np.float64))
        rel = np.abs(out - exact) / np.maximum(np.abs(exact), np.finfo(dtype).tiny)
        assert rel.max() < bound, (dtype, rel.max(), x[rel.argmax()])
        nan_out = np.empty(1, dtype)
        tanh_all(np.array([np.nan], dtype), nan_out)
        assert np.isnan(nan_out[0])
    assert fast_tanh(0.5) == math.tanh(0.5)  # outside kernels: exact
