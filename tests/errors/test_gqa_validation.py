"""Grouped-query head counts are checked before any kernel, on every entry point: a key/value with
0 heads serving query heads is a ValueError naming both head counts (it was a ZeroDivisionError
from ``hq % H`` on the cpu and reference backends)."""

import numpy as np
import pytest

import engine

#: query heads 2, key/value heads 0
Q, KV = (1, 2, 3, 4), (1, 0, 5, 4)
MESSAGE = r"key/value have 0 heads but query has 2"


@pytest.mark.parametrize("enable_gqa", [True, False])
@pytest.mark.parametrize("backend", ["auto"] + engine.list_backends())
def test_forward_refuses_zero_key_heads(backend, enable_gqa):
    q, kv = np.zeros(Q, np.float32), np.zeros(KV, np.float32)
    with pytest.raises(ValueError, match=MESSAGE) as info:
        engine.scaled_dot_product_attention(q, kv, kv, enable_gqa=enable_gqa, backend=backend)
    assert not isinstance(info.value, engine.NotSupportedError)  # validation, not a backend's refusal
    assert "query=(1, 2, 3, 4)" in str(info.value) and "key=(1, 0, 5, 4)" in str(info.value)


@pytest.mark.parametrize("backend", ["auto"] + engine.list_backends())
def test_backward_refuses_zero_key_heads(backend):
    q, kv = np.zeros(Q, np.float32), np.zeros(KV, np.float32)
    out, lse = np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match=MESSAGE):
        engine.scaled_dot_product_attention_backward(out, q, kv, kv, out, lse, enable_gqa=True, backend=backend)


def test_engine_torch_refuses_zero_key_heads():
    torch = pytest.importorskip("torch")
    import engine.torch as et

    q = torch.zeros(Q, requires_grad=True)
    kv = torch.zeros(KV)
    with pytest.raises(ValueError, match=MESSAGE):
        et.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)


def test_distributed_refuses_zero_key_heads():
    pytest.importorskip("dask.array", reason="the dask extra is not installed")
    import engine.distributed as ed

    q, kv = np.zeros(Q, np.float32), np.zeros(KV, np.float32)
    with pytest.raises(ValueError, match=MESSAGE):
        ed.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)


def test_zero_query_heads_over_key_heads_is_still_an_empty_result():
    """0 query heads over 2 key heads (0 is a multiple of 2): an empty output, as before."""
    q, kv = np.zeros((1, 0, 3, 4), np.float32), np.zeros((1, 2, 5, 4), np.float32)
    out = engine.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert out.shape == (1, 0, 3, 4)
