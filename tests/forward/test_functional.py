"""Every available backend against the reference backend, over the whole functional semantics.

The specification of the forward for every backend: under the CUDA simulator (``tests/simulator.py``)
the tests marked ``simulator`` run for ``cuda``, on shapes around its tiny tiles instead of the cpu's.
"""

import numpy as np
import pytest

import engine

from conftest import available_backends, randn
from simulator import simulated
from tolerances import assert_out_close, lse_atol, out_atol

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
# the same kinds around the simulator's cuda tiles (4 query rows, 8 keys): L and S not tile
# multiples, L > S, two batch dims, GQA, 2-D inputs
SIM_SHAPES = [
    ((1,), 1, 1, 1, 1, 8, 8),
    ((2,), 3, 3, 13, 21, 8, 5),
    ((1,), 2, 2, 17, 6, 4, 4),
    ((2, 2), 2, 2, 5, 11, 7, 7),
    ((2,), 6, 2, 9, 10, 8, 6),
    ((), 1, 1, 6, 9, 4, 3),
]


def shapes(backend):
    return SIM_SHAPES if simulated(backend) else SHAPES


def dtypes(backend):
    return [
        d for d in (np.float32, np.float64) if np.dtype(d).name in engine.get_backend(backend).capabilities()["dtypes"]
    ]


#: (backend, dtype, shape) for every backend, in its dtypes and on its shapes
CASES = [(b, d, s) for b in BACKENDS for d in dtypes(b) for s in shapes(b)]


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
    # and within the suite's roundoff model (tests/tolerances.py), which tightens with the scores
    mask = kw.get("attn_mask")
    assert_out_close(out, ref, out_atol(dtype, q, k, v, kw.get("scale"), mask), f"{backend} out")
    assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, kw.get("scale"), mask), f"{backend} lse")
    return out, lse


@pytest.mark.simulator
@pytest.mark.parametrize(("backend", "dtype", "shape"), CASES, ids=[f"{b}-{np.dtype(d).name}-{s}" for b, d, s in CASES])
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


# mask shapes over scores (2, 3, L, S): key padding, per-batch row bias, per head, shared, per key
MASK_SHAPES = {
    "key-padding": lambda L, S: (1, 1, 1, S),
    "batch-rows": lambda L, S: (2, 1, L, 1),
    "heads": lambda L, S: (3, L, S),
    "shared": lambda L, S: (L, S),
    "keys": lambda L, S: (S,),
}


@pytest.mark.simulator
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mshape", list(MASK_SHAPES))
def test_mask_broadcasting(backend, mshape, rng):
    shape = ((2,), 3, 3, 7, 11, 8, 5) if simulated(backend) else ((2,), 3, 3, 33, 70, 16, 16)
    allowed = rng.random(MASK_SHAPES[mshape](shape[3], shape[4])) > 0.4
    _compare(backend, rng, shape, np.float32, attn_mask=allowed)
    _compare(backend, rng, shape, np.float32, attn_mask=np.where(allowed, 0.5, -np.inf).astype(np.float32))


@pytest.mark.simulator
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_lse_minus_inf(backend, rng):
    n = 11 if simulated(backend) else 70
    q, k, v = (randn(rng, (2, 2, n, 8)) for _ in range(3))
    mask = rng.random((2, 1, n, n)) > 0.5
    mask[0, :, 5] = False
    mask[1, :, n - 1] = False
    out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, return_lse=True)
    assert np.all(out[0, :, 5] == 0) and np.all(out[1, :, n - 1] == 0)
    assert np.all(np.isneginf(lse[0, :, 5])) and np.all(np.isneginf(lse[1, :, n - 1]))
    ref = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5)
    float_mask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    out_f = engine.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, backend=backend)
    np.testing.assert_allclose(out_f, ref, atol=2e-5)


@pytest.mark.simulator
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_fully_masked_rows_stay_zero_with_nonfinite_values(backend, rng):
    """A row that sees no key is zeros with lse -inf even where ``value`` holds NaN/inf (the
    reference oracle once added them to such rows: their weights exp(-inf - (-inf)) were NaN)."""
    n = 11 if simulated(backend) else 37
    q, k, v = (randn(rng, (1, 2, n, 8)) for _ in range(3))
    v[0, 0, 3, 0], v[0, 1, 4, 1] = np.inf, np.nan
    mask = np.ones((n, n), bool)
    mask[5] = False  # row 5 sees nothing
    mask[:, 3] = mask[:, 4] = False  # no row sees the non-finite values...
    mask[7, 3] = mask[8, 4] = True  # ...but rows 7 (head 0: inf) and 8 (head 1: NaN)
    out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, return_lse=True)
    assert np.all(out[0, :, 5] == 0) and np.all(np.isneginf(lse[0, :, 5]))
    assert np.isinf(out[0, 0, 7, 0]) and np.isnan(out[0, 1, 8, 1])
    others = np.ones(n, bool)
    others[[7, 8]] = False
    assert np.isfinite(out[0, :, others]).all()


# L < S, L > S, one past a key tile, exactly one tile (of the cpu; of cuda under the simulator)
CAUSAL_SIZES = {"cpu": [(5, 300), (300, 5), (257, 257), (64, 256)], "simulator": [(3, 21), (21, 3), (9, 9), (4, 8)]}


@pytest.mark.simulator
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", range(4), ids=["l-lt-s", "l-gt-s", "tile-plus-one", "one-tile"])
def test_causal_top_left(backend, size, rng):
    L, S = CAUSAL_SIZES["simulator" if simulated(backend) else "cpu"][size]
    _compare(backend, rng, ((1,), 2, 2, L, S, 8, 8), np.float32, is_causal=True)


@pytest.mark.simulator
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, rng):
    L, S = (9, 17) if simulated(backend) else (40, 80)
    base = randn(rng, (2, L, 3, 16))
    q = base.transpose(0, 2, 1, 3)  # (2, 3, L, 16) with odd strides
    k = randn(rng, (2, 3, S, 32))[..., ::2]  # strided last axis
    v = randn(rng, (2, 3, S, 8))[:, :, ::-1]  # negative stride
    out = engine.scaled_dot_product_attention(q, k, v, backend=backend)
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.simulator
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes(backend, rng):
    q = np.zeros((1, 2, 0, 4), np.float32)
    k = np.ones((1, 2, 5, 4), np.float32)
    assert engine.scaled_dot_product_attention(q, k, k, backend=backend).shape == (1, 2, 0, 4)
    q = np.ones((1, 2, 3, 4), np.float32)
    k = np.zeros((1, 2, 0, 4), np.float32)
    out, lse = engine.scaled_dot_product_attention(q, k, k[..., :3], backend=backend, return_lse=True)
    assert out.shape == (1, 2, 3, 3) and np.all(out == 0) and np.all(np.isneginf(lse))
    # E = 0: every score is 0, uniform weights; a backend that does not take it says so by name
    q, k, v = randn(rng, (1, 2, 5, 0)), randn(rng, (1, 2, 7, 0)), randn(rng, (1, 2, 7, 3))
    if "E = 0" in " ".join(engine.get_backend(backend).not_supported_reasons(_problem(q, k, v, scale=1.0))):
        with pytest.raises(engine.NotSupportedError, match="E = 0"):
            engine.scaled_dot_product_attention(q, k, v, scale=1.0, backend=backend)
    else:
        out = engine.scaled_dot_product_attention(q, k, v, scale=1.0, backend=backend)
        np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=2, keepdims=True), out.shape), atol=1e-6)


def _problem(q, k, v, **kw):
    from engine.problems.attention import validate_attention_args

    return validate_attention_args(q, k, v, **kw)


def test_auto_picks_a_backend_that_supports_the_inputs(rng):
    q = randn(rng, (1, 1, 4, 8))
    assert engine.scaled_dot_product_attention(q, q, q).dtype == np.float32
    q16 = q.astype(np.float16)
    assert engine.scaled_dot_product_attention(q16, q16, q16).dtype == np.float16
    assert engine.scaled_dot_product_attention(q16, q16, q16, backend="cpu").dtype == np.float16
    with pytest.raises(ValueError, match="backend 'cpu' cannot run these inputs: E = 0"):
        engine.scaled_dot_product_attention(q16[..., :0], q16[..., :0], q16, scale=1.0, backend="cpu")
