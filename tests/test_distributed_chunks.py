"""engine.distributed with chunks that users make: trailing (and every other) empty chunk with a
``mask_mod``, and grouped-query attention with the query chunked one head per chunk (or any way),
computed on a LocalCluster against one single-process call.

Before, a trailing empty chunk with a mask_mod raised ``IndexError`` in ``logical_or.reduceat``
while the graph was built, and GQA refused query head chunks that were not multiples of the group
("the query's head chunks must be multiples of 2")."""

import numpy as np
import pytest

import engine

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")
import engine.distributed as ed  # noqa: E402

pytestmark = pytest.mark.xdist_group("dask")

ATOL = {np.float32: 1e-5, np.float64: 1e-10}


def _window(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= 4 + h


def _head_bias(score, b, h, q_idx, kv_idx):
    return score - 0.25 * h + 0.01 * (q_idx - kv_idx)


def _compute(client, got):
    out, lse = client.compute(list(got), sync=True)
    return out, lse


def _check(client, got, expected, dtype):
    out, lse = _compute(client, got)
    np.testing.assert_allclose(out, expected[0], rtol=0, atol=ATOL[dtype])
    np.testing.assert_allclose(lse, expected[1], rtol=0, atol=ATOL[dtype])
    assert out.dtype == dtype and out.shape == expected[0].shape
    return out, lse


# (query L chunks, key S chunks)
EMPTY_CHUNKS = {
    "trailing empty key chunk": ((12,), (12, 0)),
    "trailing empty query chunk": ((5, 7, 0), (12,)),
    "trailing empty chunks on both": ((5, 7, 0, 0), (4, 8, 0)),
    "empty chunks everywhere": ((0, 5, 0, 7, 0), (0, 6, 0, 6, 0)),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(EMPTY_CHUNKS))
def test_empty_chunks_with_a_mask_mod(dask_client, case, causal):
    qc, kc = EMPTY_CHUNKS[case]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 12, 8)) for _ in range(3))
    kw = dict(mask_mod=_window, is_causal=causal)
    got = ed.scaled_dot_product_attention(
        da.from_array(q, chunks=(1, 2, qc, 8)),
        da.from_array(k, chunks=(1, 2, kc, 8)),
        da.from_array(v, chunks=(1, 2, kc, 8)),
        return_lse=True,
        **kw,
    )
    assert got[0].chunks[-2] == qc  # the output keeps the query's chunks, empty ones included
    expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    _check(dask_client, got, expected, np.float64)


def test_empty_chunks_make_no_pair_tasks():
    q = da.zeros((1, 2, 12, 8), chunks=(1, 2, (5, 7, 0), 8))
    k = da.zeros((1, 2, 12, 8), chunks=(1, 2, (12, 0), 8))
    out = ed.scaled_dot_product_attention(q, k, k, mask_mod=_window)
    graph = dict(out.__dask_graph__())
    pairs = [key for key in graph if isinstance(key, tuple) and str(key[0]).startswith("attention-pair-")]
    assert sorted(key[-2:] for key in pairs) == [(0, 0), (1, 0)]  # no pair reads an empty chunk
