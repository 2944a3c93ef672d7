"""The functional API broadcasts the leading dims of query, key and value as torch does (a
key/value batch of 1 serves every query batch; fewer dims; a head axis of 1), on every backend,
against ``torch.nn.functional.scaled_dot_product_attention``."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine

from conftest import available_backends

TOL = {np.float32: 1e-5, np.float64: 1e-10}

# (query, key, value shapes, enable_gqa)
CASES = [
    ((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8), False),  # the field report: kv batch 1, query batch 2
    ((1, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), False),  # the query broadcasts instead
    ((2, 4, 5, 8), (1, 4, 6, 8), (2, 4, 6, 8), False),  # key and value broadcast differently
    ((2, 4, 5, 8), (4, 6, 8), (4, 6, 8), False),  # fewer dims
    ((2, 4, 5, 8), (6, 8), (6, 8), False),  # 2-D key/value
    ((2, 4, 5, 8), (1, 1, 6, 8), (1, 1, 6, 8), False),  # one head for all, without enable_gqa
    ((2, 1, 5, 8), (2, 4, 6, 8), (2, 4, 6, 16), False),  # the query's head broadcasts, E != Ev
    ((3, 2, 4, 5, 8), (1, 2, 4, 6, 8), (1, 2, 4, 6, 8), False),  # two batch dims
    ((2, 4, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), True),  # broadcast and GQA together
]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", CASES, ids=[f"{q}-{k}-{v}" for q, k, v, _ in CASES])
def test_broadcast_batch_dims_match_torch(backend, dtype, shapes):
    qs, ks, vs, gqa = shapes
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in (qs, ks, vs))
    expected = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), enable_gqa=gqa).numpy()
    out, lse = engine.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, backend=backend, return_lse=True)
    assert out.shape == expected.shape and lse.shape == expected.shape[:-1]
    np.testing.assert_allclose(out, expected, atol=TOL[dtype], rtol=0)
    # with masks and causal too: the mask broadcasts to the broadcast score shape
    mask = rng.random(expected.shape[:-1] + (ks[-2],)) > 0.3
    out = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, backend=backend)
    expected = F.scaled_dot_product_attention(
        *map(torch.from_numpy, (q, k, v)), attn_mask=torch.from_numpy(mask), enable_gqa=gqa
    ).numpy()
    np.testing.assert_allclose(out, expected, atol=TOL[dtype], rtol=0)


def test_broadcasting_does_not_copy_the_callers_arrays():
    k = np.ones((1, 4, 6, 8), np.float32)
    k.setflags(write=False)
    q = np.ones((2, 4, 5, 8), np.float32)
    engine.scaled_dot_product_attention(q, k, k, backend="cpu")  # a read-only key is fine
    assert k.shape == (1, 4, 6, 8)


@pytest.mark.parametrize(
    "qs, ks, vs, message",
    [
        ((2, 4, 5, 8), (3, 4, 6, 8), (3, 4, 6, 8), r"batch dimensions of query, key and value must broadcast"),
        ((2, 3, 4, 5, 8), (2, 2, 4, 6, 8), (2, 2, 4, 6, 8), r"must broadcast .* query=\(2, 3, 4, 5, 8\)"),
        ((2, 4, 5, 8), (2, 4, 6, 8), (2, 2, 6, 8), r"key and value must have the same number of heads \(or one"),
    ],
)
def test_shapes_that_do_not_broadcast_are_named(qs, ks, vs, message):
    z = np.zeros
    with pytest.raises(ValueError, match=message):
        engine.scaled_dot_product_attention(z(qs, np.float32), z(ks, np.float32), z(vs, np.float32))
