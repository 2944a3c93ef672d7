"""Every numerical tolerance of the hardening tests, in one place.

A backend is compared with the ``reference`` backend, which computes in float64 from the same
inputs and rounds once at the end. The error of a float32 or float64 backend grows with the size of
the scores: a score s is only known to about ``u * |s|`` (u = unit roundoff), and an error d in a
score moves the softmax weights, and so the output, by at most ``2 * d * max|v|``. So the bounds
below are "so many units of roundoff, times the size of the scores, times the size of v", and the
constant in front is what the tests were measured to need, with a margin of about 4x:

    |out - ref| <= OUT_UNITS[dtype] * u * (1 + smax) * max(1, max|v|)
    |lse - ref_lse| <= LSE_UNITS[dtype] * u * (1 + smax + log(S))

where ``smax`` bounds the magnitude of any finite scaled, masked score:
``|scale| * max_i |q_i| * max_j |k_j| + max|finite float mask|`` (Cauchy-Schwarz).

Variants add projections before and after attention; their bound is relative to the size of the
result: ``|out - ref| <= VARIANT_UNITS[dtype] * u * max(1, max|ref|)`` (the same for weights).

``LONG_F32_BOUND`` is the stated bound of float32 (``cpu`` backend) against a float64 reference
up to L = S = 16384 for unit-normal q, k, v and the default scale: max abs error of the output
divided by max|v|.
"""

from __future__ import annotations

import math

import numpy as np

#: unit roundoff per dtype
UNIT = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}

OUT_UNITS = {np.dtype(np.float32): 8.0, np.dtype(np.float64): 8.0}
LSE_UNITS = {np.dtype(np.float32): 8.0, np.dtype(np.float64): 8.0}

# 16-bit inputs: computed in float32 and rounded once (cpu), against float64 rounded once
# (reference), the two differ by at most one 16-bit step of the value, so the same model holds
# with the 16-bit unit roundoff (2^-11 float16, 2^-8 bfloat16)
try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
    UNIT[_BF16], OUT_UNITS[_BF16], LSE_UNITS[_BF16] = 2.0**-8, 8.0, 8.0
except ImportError:
    pass
UNIT[np.dtype(np.float16)], OUT_UNITS[np.dtype(np.float16)], LSE_UNITS[np.dtype(np.float16)] = 2.0**-11, 8.0, 8.0
VARIANT_UNITS = {np.dtype(np.float32): 32.0, np.dtype(np.float64): 32.0}

#: float32 vs float64, L = S up to 16384, unit-normal inputs: |out - ref| / max|v|
LONG_F32_BOUND = 2e-7


def _max_abs(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    finite = x[np.isfinite(x)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def score_bound(q, k, scale, attn_mask=None) -> float:
    """An upper bound on |score| for any finite scaled, masked score of these inputs."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    E = q.shape[-1]
    s = 1.0 / math.sqrt(E) if scale is None else abs(float(scale))
    qn = float(np.sqrt((q * q).sum(-1)).max()) if q.size else 0.0
    kn = float(np.sqrt((k * k).sum(-1)).max()) if k.size else 0.0
    m = 0.0
    if attn_mask is not None and np.asarray(attn_mask).dtype.kind == "f":
        m = _max_abs(attn_mask)
    return s * qn * kn + m


def out_atol(dtype, q, k, v, scale, attn_mask=None) -> float:
    dtype = np.dtype(dtype)
    smax = score_bound(q, k, scale, attn_mask)
    return OUT_UNITS[dtype] * UNIT[dtype] * (1.0 + smax) * max(1.0, _max_abs(v))


def lse_atol(dtype, q, k, scale, attn_mask=None) -> float:
    dtype = np.dtype(dtype)
    smax = score_bound(q, k, scale, attn_mask)
    S = max(1, np.asarray(k).shape[-2])
    return LSE_UNITS[dtype] * UNIT[dtype] * (1.0 + smax + math.log(S))


def variant_atol(dtype, ref) -> float:
    dtype = np.dtype(dtype)
    return VARIANT_UNITS[dtype] * UNIT[dtype] * max(1.0, _max_abs(ref))


#: the largest error / tolerance ratio seen per check name in this process (for the report)
WORST: dict[str, float] = {}


def assert_out_close(out, ref, atol, what="out"):
    """Same non-finite pattern (NaN where NaN, +-inf where +-inf), finite parts within ``atol``."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref), err_msg=f"{what}: NaN pattern differs")
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref), err_msg=f"{what}: +inf pattern differs")
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref), err_msg=f"{what}: -inf pattern differs")
    fin = np.isfinite(ref)
    if fin.any():
        err = float(np.max(np.abs(out[fin] - ref[fin])))
        WORST[what] = max(WORST.get(what, 0.0), err / atol if atol > 0 else (0.0 if err == 0 else np.inf))
        assert err <= atol, f"{what}: max abs error {err:.3g} > tolerance {atol:.3g}"
