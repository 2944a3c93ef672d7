"""Every available backend against the reference backend, over the whole functional semantics."""

import numpy as np
import pytest

import engine

from conftest import available_backends, randn

TOL = {np.float32: dict(atol=2e-5, rtol=1e-4), np.float64: dict(atol=1e-10, rtol=1e-9)}
BACKENDS = [b for b in available_backends() if b != "reference"]

# (batch shape, Hq, H, L, S, E, Ev): sizes straddle the cpu tiles (64 query rows, 256 keys)
SHAPES = [
    ((1,), 1, 1, 1, 1, 8, 8),
    ((2,), 3, 3, 65, 257, 16, 8),
    ((3,), 2, 2, 300, 7, 5, 11),
    ((2, 2), 4, 2, 33, 129, 32, 32),
    ((1,), 8, 2, 130, 300, 64, 64),
    ((), 1, 1, 17, 40, 12, 6),  # 2-D inputs (L, E)
]


def _inputs(rng, batch, Hq, H, L, S, E, Ev, dtype):
    if batch == ():
        return randn(rng, (L, E), dtype), randn(rng, (S, E), dtype), randn(rng, (S, Ev), dtype)
    return (
        randn(rng, batch + (Hq, L, E), dtype),
        randn(rng, batch + (H, S, E), dtype),
        randn(rng, batch + (H, S, Ev), dtype),
    )


def _compare(backend, rng, shape, dtype, **kw):
    batch, Hq, H, L, S, E, Ev = shape
    q, k, v = _inputs(rng, batch, Hq, H, L, S, E, Ev, dtype)
    kw.setdefault("enable_gqa", Hq != H)
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert out.shape == ref.shape == q.shape[:-1] + (Ev,)
    assert out.dtype == dtype and lse.shape == q.shape[:-1]
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    np.testing.assert_allclose(lse, ref_lse, **TOL[dtype])
    return out, lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "causal", "bool", "float", "scale"])
def test_backend_matches_reference(backend, dtype, shape, mode, rng):
    batch, Hq, H, L, S, E, Ev = shape
    kw = {}
    if mode == "causal":
        kw["is_causal"] = True
    elif mode == "scale":
        kw["scale"] = 0.37
    elif mode in ("bool", "float"):
        # a mask broadcast over heads (and batch, when there is one): (1, L, S) or (L, S)
        mshape = (L, S) if batch == () else (1,) * (len(batch) - 1) + (batch[-1], 1, L, S)
        allowed = rng.random(mshape) > 0.3
        kw["attn_mask"] = (
            allowed if mode == "bool" else np.where(allowed, rng.standard_normal(mshape), -np.inf).astype(dtype)
        )
    _compare(backend, rng, shape, dtype, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mshape", [(1, 1, 1, 70), (2, 1, 33, 1), (3, 33, 70), (33, 70), (70,)])
def test_mask_broadcasting(backend, mshape, rng):
    shape = ((2,), 3, 3, 33, 70, 16, 16)
    allowed = rng.random(mshape) > 0.4
    _compare(backend, rng, shape, np.float32, attn_mask=allowed)
    _compare(backend, rng, shape, np.float32, attn_mask=np.where(allowed, 0.5, -np.inf).astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_lse_minus_inf(backend, rng):
    q, k, v = (randn(rng, (2, 2, 70, 8)) for _ in range(3))
    mask = rng.random((2, 1, 70, 70)) > 0.5
    mask[0, :, 5] = False
    mask[1, :, 69] = False
    out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, return_lse=True)
    assert np.all(out[0, :, 5] == 0) and np.all(out[1, :, 69] == 0)
    assert np.all(np.isneginf(lse[0, :, 5])) and np.all(np.isneginf(lse[1, :, 69]))
    ref = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5)
    float_mask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    out_f = engine.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, backend=backend)
    np.testing.assert_allclose(out_f, ref, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(5, 300), (300, 5), (257, 257), (64, 256)])
def test_causal_top_left(backend, L, S, rng):
    _compare(backend, rng, ((1,), 2, 2, L, S, 8, 8), np.float32, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, rng):
    base = randn(rng, (2, 40, 3, 16))
    q = base.transpose(0, 2, 1, 3)  # (2, 3, 40, 16) with odd strides
    k = randn(rng, (2, 3, 80, 32))[..., ::2]  # strided last axis
    v = randn(rng, (2, 3, 80, 8))[:, :, ::-1]  # negative stride
    out = engine.scaled_dot_product_attention(q, k, v, backend=backend)
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_empty_sizes():
    q = np.zeros((1, 2, 0, 4), np.float32)
    k = np.ones((1, 2, 5, 4), np.float32)
    assert engine.scaled_dot_product_attention(q, k, k, backend="cpu").shape == (1, 2, 0, 4)
    q = np.ones((1, 2, 3, 4), np.float32)
    k = np.zeros((1, 2, 0, 4), np.float32)
    out, lse = engine.scaled_dot_product_attention(q, k, k, backend="cpu", return_lse=True)
    assert out.shape == (1, 2, 3, 4) and np.all(out == 0) and np.all(np.isneginf(lse))


def test_auto_picks_a_backend_that_supports_the_inputs(rng):
    q = randn(rng, (1, 1, 4, 8))
    assert engine.scaled_dot_product_attention(q, q, q).dtype == np.float32
    q16 = q.astype(np.float16)
    assert engine.scaled_dot_product_attention(q16, q16, q16).dtype == np.float16
    assert engine.scaled_dot_product_attention(q16, q16, q16, backend="cpu").dtype == np.float16
    with pytest.raises(ValueError, match="backend 'cpu' cannot run these inputs: E = 0"):
        engine.scaled_dot_product_attention(q16[..., :0], q16[..., :0], q16, scale=1.0, backend="cpu")
