"""``softcap``: tanh soft-capping of the attention scores, as in Gemma 2 (a ``score_mod``)."""

from __future__ import annotations

import math

from engine import fast_tanh, hookimpl, with_score_grad

from .multi_head import MultiHeadAttention


def tanh_softcap_grad(score, b, h, q_idx, kv_idx, cap):
    """d/d score of cap * tanh(score / cap) = 1 - tanh(score / cap)^2 (declared: the kernels'
    fast_tanh has no complex version, so complex-step differentiation cannot run)."""
    t = fast_tanh(score / cap)
    return 1 - t * t


@with_score_grad(tanh_softcap_grad)
def tanh_softcap(score, b, h, q_idx, kv_idx, cap):
    """cap * tanh(score / cap): scores smoothly bounded to (-cap, cap)."""
    return cap * fast_tanh(score / cap)


class SoftcapAttention(MultiHeadAttention):
    """Multi-head attention whose scaled scores go through ``cap * tanh(score / cap)`` before the
    softmax (Gemma 2 uses ``cap = 50``)."""

    name = "softcap"
    description = "multi-head attention with tanh soft-capped scores, as Gemma 2 (score_mod)"

    def __init__(self, embed_dim: int, num_heads: int, *, cap: float = 50.0, **kw):
        super().__init__(embed_dim, num_heads, **kw)
        if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            raise ValueError(f"cap must be a positive finite number, got {cap!r}")
        self.cap = float(cap)

    def attention_mods(self, N, L, S, **call_kwargs):
        super().attention_mods(N, L, S, **call_kwargs)
        # cap in the variant's dtype keeps the kernel's arithmetic in float32 for float32 layers
        return {"score_mod": tanh_softcap, "mod_args": (self.compute_dtype.type(self.cap),)}

    @classmethod
    def example_params(cls, embed_dim=64, num_heads=8):
        return {"embed_dim": embed_dim, "num_heads": num_heads, "cap": 2.0}


@hookimpl
def attention_variants():
    return [SoftcapAttention]
