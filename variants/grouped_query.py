"""``grouped-query``: multi-head attention with fewer key/value heads (GQA, Ainslie et al., 2023)."""

from __future__ import annotations

import numpy as np

from engine import hookimpl

from .multi_head import MultiHeadAttention


class GroupedQueryAttention(MultiHeadAttention):
    """``num_heads`` query heads share ``num_kv_heads`` key/value heads (group size
    ``num_heads // num_kv_heads``; key/value head j serves query heads j*g ... (j+1)*g - 1, as torch's
    ``enable_gqa``). Parameters: ``q_proj_weight`` (E, E), ``k_proj_weight`` and ``v_proj_weight``
    (num_kv_heads * head_dim, E), ``in_proj_bias`` (E + 2 * num_kv_heads * head_dim,), ``out_proj.*``."""

    name = "grouped-query"
    description = "multi-head attention with fewer key/value heads (GQA, num_kv_heads)"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int = 1,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        batch_first: bool = True,
        dtype=np.float32,
        seed=None,
    ):
        if (
            isinstance(num_kv_heads, bool)
            or not isinstance(num_kv_heads, int)
            or num_kv_heads < 1
            or num_heads % num_kv_heads
        ):
            raise ValueError(
                f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {num_kv_heads!r}"
            )
        self.num_kv_heads = num_kv_heads
        super().__init__(
            embed_dim,
            num_heads,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            batch_first=batch_first,
            dtype=dtype,
            seed=seed,
        )

    def _init_projections(self):
        E, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        self.register_parameter("q_proj_weight", self._xavier(E, E))
        self.register_parameter("k_proj_weight", self._xavier(kv, E))
        self.register_parameter("v_proj_weight", self._xavier(kv, E))
        if self.bias:
            self.register_parameter("in_proj_bias", np.zeros(E + 2 * kv))

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_weights(self, like=None):
        ws = tuple(self.param(n, like) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        if not self.bias:
            return ws + (None, None, None)
        E, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        b = self.param("in_proj_bias", like)
        return ws + (b[:E], b[E : E + kv], b[E + kv :])

    def attention_mods(self, N, L, S, **call_kwargs):
        super().attention_mods(N, L, S, **call_kwargs)
        return {"enable_gqa": self.num_kv_heads != self.num_heads}

    @classmethod
    def example_params(cls, embed_dim=64, num_heads=8):
        return {"embed_dim": embed_dim, "num_heads": num_heads, "num_kv_heads": max(1, num_heads // 4)}


@hookimpl
def attention_variants():
    return [GroupedQueryAttention]
