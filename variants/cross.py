"""``cross``: queries from one sequence, keys and values from another (``kdim``/``vdim``)."""

from __future__ import annotations

import numpy as np

from engine import hookimpl

from .multi_head import MultiHeadAttention


class CrossAttention(MultiHeadAttention):
    """``nn.MultiheadAttention(embed_dim, num_heads, kdim=, vdim=)`` with a required ``key``.

    ``value`` defaults to ``key``. With ``kdim``/``vdim`` different from ``embed_dim`` the
    parameters are ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (torch's names).
    """

    name = "cross"
    description = "cross-attention: queries from one sequence, keys/values from another (kdim, vdim)"

    def __call__(self, query, key=None, value=None, **kwargs):
        if key is None:
            raise ValueError("the 'cross' variant needs key (and optionally value): the sequence to attend to")
        return super().__call__(query, key, value, **kwargs)

    @classmethod
    def example_params(cls, embed_dim: int = 64, num_heads: int = 8) -> dict:
        return {
            "embed_dim": embed_dim,
            "num_heads": num_heads,
            "kdim": max(1, embed_dim // 2),
            "vdim": max(1, (3 * embed_dim) // 4),
        }

    def example_inputs(self, batch, length, key_length=None, rng=None) -> dict:
        rng = np.random.default_rng(rng)
        S = key_length or length
        return {
            "query": rng.standard_normal((batch, length, self.embed_dim)).astype(self.dtype),
            "key": rng.standard_normal((batch, S, self.kdim)).astype(self.dtype),
            "value": rng.standard_normal((batch, S, self.vdim)).astype(self.dtype),
        }


@hookimpl
def attention_variants():
    return [CrossAttention]
