"""Scaled scores far beyond float32's integers: each row's exponents are taken from its unscaled
largest score, so the result is the reference's (found 2026-12-07: ``scale=1e8`` on unit inputs
gave rows of zeros with lse -inf, ``1e30`` NaN, on the ``cpu`` forward kernel; the rounding of a
scaled shift to float32 had passed the exponential's range)."""

import ml_dtypes
import numpy as np
import pytest

import engine
from engine.backends.cpu import decode_route

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=str)
@pytest.mark.parametrize("E", [64, 128])
def test_huge_scales_and_scores_match_the_reference(dtype, E, rng, monkeypatch):
    monkeypatch.setattr(decode_route, "decode_shaped", lambda p: False)  # the forward kernel itself
    q, k, v = (rng.standard_normal((1, 2, n, E)).astype(np.float32) for n in (40, 600, 600))
    cases = [dict(scale=s, is_causal=c) for s in (1e8, 1e10, 1e30) for c in (False, True)]
    cases += [dict(inputs=1e5), dict(inputs=1e5, is_causal=True)]
    for kw in cases:
        m = kw.pop("inputs", 1.0)
        a, b, c = (x.astype(dtype) for x in (q * m, k * m, v))
        out, lse = engine.scaled_dot_product_attention(a, b, c, backend="cpu", return_lse=True, **kw)
        ref, ref_lse = engine.scaled_dot_product_attention(a, b, c, backend="reference", return_lse=True, **kw)
        assert np.isfinite(out.astype(np.float64)).all(), kw
        # (one-hot rows: each is its best key's value row, up to the output's rounding)
        got, want = out.astype(np.float64), ref.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2, err_msg=str(kw))
        np.testing.assert_allclose(lse.astype(np.float64), ref_lse.astype(np.float64), rtol=1e-2, err_msg=str(kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
def test_varlen_huge_scales_match_the_reference(dtype, rng):
    """The packed-batch kernel (``varlen_flash``) takes its exponents from unscaled maxima too: it
    gave rows of zeros at ``scale=1e8`` and NaN at ``1e30`` until 2026-12-07."""
    q = rng.standard_normal((100, 2, 64)).astype(dtype)
    k, v = (rng.standard_normal((700, 2, 64)).astype(dtype) for _ in range(2))
    cu_q, cu_k = np.array([0, 40, 100], np.int32), np.array([0, 600, 700], np.int32)
    for scale in (1e8, 1e10, 1e30):
        for causal in (False, True):
            kw = dict(scale=scale, is_causal=causal, return_lse=True)
            out, lse = engine.varlen_attention(q, k, v, cu_q, cu_k, backend="cpu", **kw)
            ref, ref_lse = engine.varlen_attention(q, k, v, cu_q, cu_k, backend="reference", **kw)
            assert np.isfinite(out).all(), kw
            np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2, err_msg=str(kw))
            np.testing.assert_allclose(lse, ref_lse, rtol=1e-2, err_msg=str(kw))
