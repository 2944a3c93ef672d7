"""The contract of ``engine.kernels.fastlog.fast_log``: within 1 ulp of NumPy's log over every
positive finite float64, and the special values."""

import numpy as np

from engine.kernels.fastlog import log_array


def _log(x):
    out = np.empty_like(x)
    log_array(x, out)
    return out


def test_within_one_ulp_over_the_whole_range(rng):
    tiny = np.finfo(np.float64).tiny
    x = np.concatenate(
        [
            np.exp(rng.uniform(-744.0, 709.7, 300_000)),  # every exponent, subnormals included
            rng.uniform(np.sqrt(0.5), np.sqrt(2.0), 100_000),  # the reduced range itself
            1.0 + rng.uniform(-1e-6, 1e-6, 10_000),  # near 1, where log is near 0
            np.array([tiny, np.nextafter(tiny, 0), 5e-324, 1.0, np.sqrt(2.0), np.finfo(np.float64).max]),
        ]
    )
    got, want = _log(x), np.log(x)
    ulp = np.spacing(np.maximum(np.abs(want), tiny))
    assert np.all(np.abs(got - want) <= ulp), np.max(np.abs(got - want) / ulp)


def test_special_values():
    x = np.array([0.0, -0.0, np.inf, -1.0, -np.inf, np.nan])
    got = _log(x)
    assert got[0] == got[1] == -np.inf and got[2] == np.inf
    assert np.isnan(got[3:]).all()
