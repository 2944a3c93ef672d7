"""``self``: the seeds' single-head self-attention: Q, K, V projections, no output projection."""

from __future__ import annotations

import numpy as np

from engine import hookimpl

from .multi_head import MultiHeadAttention


class SelfAttention(MultiHeadAttention):
    """softmax(Q K^T / sqrt(d_k)) V with Q, K, V = x W_q^T, x W_k^T, x W_v^T (one head).

    Parameters: ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,). Keys and values always
    come from the query sequence.
    """

    name = "self"
    description = "single-head self-attention of the seeds: Q/K/V projections, no output projection"
    out_projection = False

    def __init__(self, embed_dim: int, *, bias: bool = True, batch_first: bool = True, dtype=np.float32, seed=None):
        super().__init__(embed_dim, 1, bias=bias, batch_first=batch_first, dtype=dtype, seed=seed)

    def __call__(self, query, key=None, value=None, **kwargs):
        if key is not None or value is not None:
            raise ValueError(
                "the 'self' variant computes keys and values from query; pass only "
                "query (use 'cross' or 'multi-head' for separate key/value)"
            )
        return super().__call__(query, **kwargs)

    @classmethod
    def example_params(cls, embed_dim: int = 64, num_heads: int = 8) -> dict:
        return {"embed_dim": embed_dim}


@hookimpl
def attention_variants():
    return [SelfAttention]
