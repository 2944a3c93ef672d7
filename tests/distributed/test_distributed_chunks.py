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


# query head chunks, key/value head chunks, for Hq = 8 query heads over H = 2 key/value heads (g = 4)
GQA_CHUNKS = {
    "one query head per chunk, one key head per chunk": ((1,) * 8, (1, 1)),
    "one query head per chunk, key heads whole": ((1,) * 8, (2,)),
    "query chunks inside groups": ((2, 2, 2, 2), (1, 1)),
    "query chunk straddling a group boundary": ((3, 5), (2,)),
    "uneven, straddling and whole": ((1, 6, 1), (1, 1)),
    "query chunks twice the key's (as before)": ((4, 4), (1, 1)),
    "query whole, key heads split": ((8,), (1, 1)),
}


@pytest.mark.parametrize(
    "case, dtype", [(c, np.float64) for c in GQA_CHUNKS] + [("one query head per chunk, key heads whole", np.float32)]
)
def test_gqa_with_any_query_head_chunks(dask_client, case, dtype):
    qh, kh = GQA_CHUNKS[case]
    rng = np.random.default_rng(list(GQA_CHUNKS).index(case))
    q = rng.standard_normal((2, 8, 12, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, 12, 8)).astype(dtype)
    v = rng.standard_normal((2, 2, 12, 6)).astype(dtype)
    kw = dict(enable_gqa=True, score_mod=_head_bias, mask_mod=_window)

    def run(q_heads, k_heads):
        return ed.scaled_dot_product_attention(
            da.from_array(q, chunks=(1, q_heads, 5, 8)),
            da.from_array(k, chunks=(1, k_heads, 7, 8)),
            da.from_array(v, chunks=(1, k_heads, 7, 6)),
            return_lse=True,
            **kw,
        )

    got = run(qh, kh)
    assert got[0].chunks[1] == qh and got[1].chunks[1] == qh  # the output keeps the query's head chunks
    expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    out, lse = _check(dask_client, got, expected, dtype)
    # exact as before: the same bits as the chunking that was already accepted (whole groups)
    before_out, before_lse = _compute(dask_client, run((4, 4), (1, 1)))
    np.testing.assert_array_equal(out, before_out)
    np.testing.assert_array_equal(lse, before_lse)


def test_gqa_query_per_head_with_a_head_chunked_mask(dask_client):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 4, 10, 8))
    k = rng.standard_normal((1, 2, 10, 8))
    mask = rng.standard_normal((1, 4, 10, 10))
    got = ed.scaled_dot_product_attention(
        da.from_array(q, chunks=(1, (1, 3), 10, 8)),
        da.from_array(k, chunks=(1, 1, 10, 8)),
        da.from_array(k, chunks=(1, 1, 10, 8)),
        attn_mask=da.from_array(mask, chunks=(1, (1, 3), 10, 10)),
        enable_gqa=True,
        return_lse=True,
    )
    assert got[0].chunks[1] == (1, 3)
    expected = engine.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True, return_lse=True)
    _check(dask_client, got, expected, np.float64)


def test_one_key_head_serves_query_heads_chunked_any_way(dask_client):
    """A key/value of one head broadcasts (Hq // 1 heads per group): any query head chunks."""
    rng = np.random.default_rng(8)
    q, k = rng.standard_normal((2, 6, 9, 8)), rng.standard_normal((2, 1, 9, 8))
    got = ed.scaled_dot_product_attention(da.from_array(q, chunks=(1, (1, 2, 3), 9, 8)), k, k, return_lse=True)
    expected = engine.scaled_dot_product_attention(q, k, k, return_lse=True)
    _check(dask_client, got, expected, np.float64)


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_no_heads_at_all_gives_the_empty_result(enable_gqa):
    """0 query and 0 key heads: an empty result, as the NumPy API (was ZeroDivisionError while the
    graph was built)."""
    q = np.zeros((1, 0, 4, 8), np.float32)
    got = ed.scaled_dot_product_attention(
        da.from_array(q), da.from_array(q), da.from_array(q), enable_gqa=enable_gqa
    ).compute(scheduler="sync")
    assert got.shape == (1, 0, 4, 8) and got.dtype == np.float32
