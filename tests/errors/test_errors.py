"""Bad arguments give a ValueError/TypeError naming the argument and shapes, before any kernel."""

import numpy as np
import pytest

import engine

f = engine.scaled_dot_product_attention
Q = np.zeros((2, 4, 5, 8), np.float32)
K = np.zeros((2, 4, 7, 8), np.float32)
V = np.zeros((2, 4, 7, 6), np.float32)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((np.zeros(8, np.float32), K, V), {}, ValueError, r"query must have at least 2 dimensions .* got shape \(8,\)"),
        (
            (Q, np.zeros((3, 4, 7, 8), np.float32), np.zeros((3, 4, 7, 6), np.float32)),
            {},
            ValueError,
            r"batch dimensions of query, key and value must broadcast .* query=\(2, 4, 5, 8\), key=\(3, 4, 7, 8\)",
        ),
        ((Q, K[:, :3], V[:, :3]), {}, ValueError, r"query has 4 heads but key/value have 3; pass enable_gqa=True"),
        (
            (Q, K[:, :3], V[:, :3]),
            {"enable_gqa": True},
            ValueError,
            r"multiple of the key/value head count, got 4 and 3",
        ),
        ((Q, K[..., :4], V), {}, ValueError, r"same feature size E, got query=\(2, 4, 5, 8\), key=\(2, 4, 7, 4\)"),
        ((Q, K, V[:, :, :6]), {}, ValueError, r"same sequence length S, got key=\(2, 4, 7, 8\), value=\(2, 4, 6, 6\)"),
        ((Q, K, V[:, :2]), {}, ValueError, r"key and value must have the same number of heads \(or one of them 1\)"),
        ((Q.astype(np.int32), K, V), {}, TypeError, r"query must have a floating dtype .* got int32"),
        ((Q, K.astype(np.complex64), V), {}, TypeError, r"key must have a floating dtype .* got complex64"),
        ((Q, K, V.astype(np.float64)), {}, TypeError, r"share one dtype, got float32, float32, float64"),
        (
            (Q, K, V),
            {"attn_mask": np.zeros((3, 5, 7), bool)},
            ValueError,
            r"attn_mask of shape \(3, 5, 7\) is not broadcastable to the score shape \(2, 4, 5, 7\)",
        ),
        (
            (Q, K, V),
            {"attn_mask": np.zeros((5, 7), np.int64)},
            TypeError,
            r"attn_mask must be boolean .* got dtype int64",
        ),
        (
            (Q, K, V),
            {"attn_mask": np.ones((5, 7), bool), "is_causal": True},
            ValueError,
            r"either attn_mask or is_causal",
        ),
        ((Q, K, V), {"scale": float("nan")}, ValueError, r"scale must be finite, got nan"),
        ((Q, K, V), {"scale": "big"}, TypeError, r"scale must be a real number or None, got str"),
        ((Q, K, V), {"backend": "tpu"}, ValueError, r"unknown backend 'tpu'; available: auto, cpu, cuda, reference"),
    ],
)
def test_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        f(*args, **kwargs)


def test_unavailable_backend_lists_its_reasons():
    reasons = engine.get_backend("cuda").unavailable_reason()
    if reasons is None:
        pytest.skip("a CUDA GPU is present; nothing to refuse")  # never the case in CI (no GPU)
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run these inputs: "):
        f(Q, K, V, backend="cuda")
