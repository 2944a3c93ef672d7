"""Wide heads, correct today and kept so: head dims 256 and 512 (forward and backward, padded and
packed batches) and MLA-shaped decoding (DeepSeek's multi-head latent attention: 576-wide queries
and keys, 512-wide values, one cache head shared by every query head), every fast backend
against the float64 ``reference`` oracle."""

import numpy as np
import pytest

import engine
from engine.problems.attention import BackwardProblem
from engine.problems.varlen import VarlenBackwardProblem

from conftest import available_backends, randn
from tolerances import assert_out_close, lse_atol, out_atol

FAST = [n for n in available_backends() if n != "reference"]
BACKWARD = [n for n in FAST if engine.get_backend(n).op(BackwardProblem) is not None]
DECODERS = [n for n in FAST if engine.get_backend(n).supports_decode]


def _as64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("E, Ev", [(256, 256), (512, 512), (576, 512)])
def test_forward(rng, backend, E, Ev):
    q, k = randn(rng, (2, 4, 70, E)), randn(rng, (2, 2, 150, E))
    v = randn(rng, (2, 2, 150, Ev))
    for causal in (False, True):
        got = engine.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=True, return_lse=True, backend=backend
        )
        want = engine.scaled_dot_product_attention(
            *_as64(q, k, v), is_causal=causal, enable_gqa=True, return_lse=True, backend="reference"
        )
        assert_out_close(got[0], want[0], out_atol(np.float32, q, k, v, None), what=f"out E={E}")
        assert_out_close(got[1], want[1], lse_atol(np.float32, q, k, None), what=f"lse E={E}")


@pytest.mark.parametrize("backend", BACKWARD)
@pytest.mark.parametrize("E", [256, 512])
def test_backward(rng, backend, E):
    q, k, v = (randn(rng, (1, 2, n, E), np.float64) for n in (40, 90, 90))
    out, lse = engine.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    g = randn(rng, out.shape, np.float64)
    got = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=True, backend=backend)
    want = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=True, backend="reference")
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, atol=1e-10 * max(1.0, float(np.abs(b).max())), err_msg=name)


@pytest.mark.parametrize("E", [256, 512])
def test_varlen_forward_and_backward(rng, E):
    """Packed sequences with wide heads on every backend with a varlen op (the backward's query
    tiles shrink to 64 rows for heads over 128 wide)."""
    cu = np.array([0, 3, 140, 141], np.int32)
    q, k, v = (randn(rng, (141, 2, E), np.float64) for _ in range(3))
    want = engine.varlen_attention(q, k, v, cu, cu, is_causal=True, return_lse=True, backend="reference")
    g = randn(rng, want[0].shape, np.float64)
    want_grads = engine.varlen_attention_backward(g, q, k, v, *want, cu, cu, is_causal=True, backend="reference")
    for backend in FAST:
        if engine.get_backend(backend).op(VarlenBackwardProblem) is None:
            continue
        got = engine.varlen_attention(q, k, v, cu, cu, is_causal=True, return_lse=True, backend=backend)
        np.testing.assert_allclose(got[0], want[0], atol=1e-12)
        grads = engine.varlen_attention_backward(g, q, k, v, *want, cu, cu, is_causal=True, backend=backend)
        for a, b in zip(grads, want_grads):
            np.testing.assert_allclose(a, b, atol=1e-10 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("page_size", [None, 16])
def test_mla_shaped_decode(rng, backend, page_size):
    """DeepSeek-style MLA decode: 16 query heads on one latent cache head, keys 576 wide (512 latent
    + 64 rotary), values 512 wide, one new token per sequence, ragged caches."""
    B, Hq, D, Dv, S_max = 3, 16, 576, 512, 96
    seqlens = np.array([40, 0, 95], np.int32)
    case = dict(
        query=randn(rng, (B, Hq, 1, D)),
        k_cache=randn(rng, (B, 1, S_max, D)),
        v_cache=randn(rng, (B, 1, S_max, Dv)),
        key=randn(rng, (B, 1, 1, D)),
        value=randn(rng, (B, 1, 1, Dv)),
        cache_seqlens=seqlens,
        scale=1.0 / np.sqrt(192.0),  # MLA scales by the query-key head size before absorption
    )
    if page_size:
        table = rng.permutation(B * S_max // page_size).astype(np.int32).reshape(B, -1)
        pages = {}
        for name in ("k_cache", "v_cache"):
            c = case[name]
            p = np.empty((B * S_max // page_size, 1, page_size, c.shape[3]), np.float32)
            for b in range(B):
                for t in range(S_max):
                    p[table[b, t // page_size], :, t % page_size] = c[b, :, t]
            pages[name] = p
        case = dict(case, **pages, page_table=table)
    runs = {}
    for name in ("reference", backend):
        c = dict(case, k_cache=case["k_cache"].copy(), v_cache=case["v_cache"].copy())
        runs[name] = engine.attention_with_kvcache(**c, return_lse=True, backend=name), c
    (got, gc), (want, wc) = runs[backend], runs["reference"]
    assert got[0].shape == (B, Hq, 1, Dv)
    q, kc, vc = case["query"], wc["k_cache"], wc["v_cache"]
    assert_out_close(got[0], want[0], 4 * out_atol(np.float32, q, kc, vc, case["scale"]), what="mla out")
    assert_out_close(got[1], want[1], 4 * lse_atol(np.float32, q, kc, case["scale"]), what="mla lse")
    np.testing.assert_array_equal(gc["k_cache"], wc["k_cache"])
