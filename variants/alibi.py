"""``alibi``: attention with linear biases (Press et al., 2022), a ``score_mod`` with per-head slopes."""

from __future__ import annotations

import math

import numpy as np

from engine import cast_like, hookimpl

from .multi_head import MultiHeadAttention


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The paper's slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads; for n not a
    power of two, the slopes of the closest smaller power of two, then every other slope of 2n."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float64)


def alibi_bias(score, b, h, q_idx, kv_idx, slopes):
    """score - slope[h] * |q_idx - kv_idx| (for causal attention: slope[h] * (kv_idx - q_idx))."""
    return score - slopes[h] * cast_like(abs(q_idx - kv_idx), score)


class AlibiAttention(MultiHeadAttention):
    """Multi-head self-attention with ALiBi position biases instead of position embeddings.
    Causal by default, as in the paper's language models (``causal=False`` for encoders)."""

    name = "alibi"
    description = "multi-head attention with ALiBi linear position biases per head (score_mod)"

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = True, **kw):
        super().__init__(embed_dim, num_heads, **kw)
        self.causal = bool(causal)
        self.slopes = alibi_slopes(self.num_heads)

    def __call__(self, query, key=None, value=None, **kwargs):
        if self.causal:
            kwargs["is_causal"] = True
        return super().__call__(query, key, value, **kwargs)

    def attention_mods(self, N, L, S, **call_kwargs):
        super().attention_mods(N, L, S, **call_kwargs)
        return {"score_mod": alibi_bias, "mod_args": (self.slopes.astype(self.compute_dtype),)}


@hookimpl
def attention_variants():
    return [AlibiAttention]
