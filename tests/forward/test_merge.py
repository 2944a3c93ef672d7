"""``engine.merge_attention``: partial results over disjoint key sets merge into the result over
their union, checked against one ``reference`` call over all the keys."""

import numpy as np
import pytest

import engine

from conftest import randn
from tolerances import assert_out_close, lse_atol, out_atol

ref = engine.get_backend("reference")


def _attend(q, k, v, mask):
    return engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference", return_lse=True)


def _split_columns(S, parts, rng, contiguous):
    if contiguous:
        cuts = np.sort(rng.choice(np.arange(1, S), parts - 1, replace=False))
        return np.split(np.arange(S), cuts)
    owner = rng.integers(0, parts, S)
    return [np.nonzero(owner == p)[0] for p in range(parts)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False], ids=["chunks", "scattered"])
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_merge_equals_one_call_over_the_union(rng, dtype, contiguous, parts):
    B, H, L, S, E, Ev = 2, 3, 6, 40, 8, 5
    q, k, v = randn(rng, (B, H, L, E), dtype), randn(rng, (B, H, S, E), dtype), randn(rng, (B, H, S, Ev), dtype)
    # a mask that empties whole rows in some parts (and row 0 everywhere)
    mask = rng.random((B, H, L, S)) > 0.6
    mask[:, :, 0] = False
    whole, whole_lse = _attend(q, k, v, mask)
    outs, lses = [], []
    for cols in _split_columns(S, parts, rng, contiguous):
        o, s = _attend(q, k[..., cols, :], v[..., cols, :], mask[..., cols])
        outs.append(o)
        lses.append(s)
    out, lse = engine.merge_attention(outs, lses)
    assert out.dtype == dtype and lse.dtype == dtype
    assert_out_close(out, whole, 4 * out_atol(dtype, q, k, v, None))
    assert_out_close(lse, whole_lse, 4 * lse_atol(dtype, q, k, None), what="lse")
    assert np.all(out[:, :, 0] == 0) and np.all(np.isneginf(lse[:, :, 0]))


def test_stacked_parts_and_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    outs = randn(rng, (3, 4, 7))
    lses = randn(rng, (3, 4))
    a = engine.merge_attention(outs, lses)
    b = engine.merge_attention([torch.from_numpy(o) for o in outs], list(lses))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # the formula itself, in float64
    w = np.exp(lses.astype(np.float64) - np.log(np.exp(lses.astype(np.float64)).sum(0)))
    np.testing.assert_allclose(a[0], (w[..., None] * outs).sum(0), rtol=1e-5, atol=1e-6)


def test_empty_parts_give_zeros_and_minus_inf_never_nan():
    outs = np.array([[[np.nan, np.inf]], [[5.0, 6.0]]], np.float32)  # an empty part's out is ignored
    lses = np.array([[-np.inf], [-np.inf]], np.float32)
    out, lse = engine.merge_attention(outs, lses)
    np.testing.assert_array_equal(out, [[0.0, 0.0]])
    assert np.isneginf(lse[0])
    out, lse = engine.merge_attention(outs, np.array([[-np.inf], [0.5]], np.float32))
    np.testing.assert_array_equal(out, [[5.0, 6.0]])
    assert lse[0] == np.float32(0.5)


def test_nan_propagation():
    outs = np.array([[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], [[3.0, np.nan], [3.0, 4.0], [3.0, np.nan]]])
    lses = np.array([[0.0, 0.0, 0.0], [0.0, np.nan, -800.0]])  # row 2: part 1's weight underflows to exactly 0
    out, lse = engine.merge_attention(outs, lses)
    assert out[0, 0] == 2.0 and np.isnan(out[0, 1]) and lse[0] == pytest.approx(np.log(2.0))
    assert np.isnan(out[1]).all() and np.isnan(lse[1])  # a NaN score somewhere: the row is NaN
    np.testing.assert_array_equal(out[2], [1.0, 2.0])  # zero weight: the NaN does not leak
    out, lse = engine.merge_attention(outs[:, :1], np.array([[np.inf], [0.0]]))
    assert np.isnan(out).all() and np.isnan(lse).all()  # exp(inf - inf), as in a single call
    out, lse = engine.merge_attention(outs[:, :1], np.array([[-np.inf], [np.nan]]))
    assert np.isnan(out).all() and np.isnan(lse).all()  # NaN, not "every part empty"


def test_sixteen_bit_parts_and_mixed_out_lse_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    outs = randn(rng, (2, 3, 4))
    lses = randn(rng, (2, 3))
    want, want_lse = engine.merge_attention(outs, lses)
    for dt in (np.float16, ml_dtypes.bfloat16):
        out, lse = engine.merge_attention(outs.astype(dt), lses)
        assert out.dtype == dt and lse.dtype == np.float32
        np.testing.assert_allclose(out.astype(np.float32), want, atol=2e-2)
    out, lse = engine.merge_attention(outs, lses.astype(np.float64))
    assert out.dtype == np.float32 and lse.dtype == np.float64


@pytest.mark.parametrize(
    "outs, lses, exc, words",
    [
        ([], [], ValueError, r"outs must hold at least one part"),
        ([np.zeros((2, 3))], [np.zeros(2), np.zeros(2)], ValueError, r"same number of parts, got 1 and 2"),
        (
            [np.zeros((2, 3)), np.zeros((2, 4))],
            [np.zeros(2)] * 2,
            ValueError,
            r"outs\[1\] has shape \(2, 4\), expected \(2, 3\)",
        ),
        ([np.zeros((2, 3))], [np.zeros(3)], ValueError, r"lses\[0\] has shape \(3,\), expected \(2,\)"),
        ([np.zeros((2, 3), np.int32)], [np.zeros(2)], TypeError, r"outs\[0\] must have a floating dtype"),
        (
            [np.zeros((2, 3), np.float32), np.zeros((2, 3))],
            [np.zeros(2)] * 2,
            TypeError,
            r"every part of outs must have one dtype",
        ),
        ("abc", [np.zeros(2)], TypeError, r"outs must be a list or tuple of arrays"),
        (np.float32(1.0), [np.zeros(2)], ValueError, r"parts on its first axis, got shape \(\)"),
    ],
)
def test_bad_arguments(outs, lses, exc, words):
    with pytest.raises(exc, match=words):
        engine.merge_attention(outs, lses)
