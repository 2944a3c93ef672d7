"""``sliding-window``: each query sees the keys within a window around its own position."""

from __future__ import annotations

from engine import hookimpl

from .multi_head import MultiHeadAttention


def window_mask(b, h, q_idx, kv_idx, left, right):
    """May attend when q_idx - left <= kv_idx <= q_idx + right."""
    return q_idx - left <= kv_idx and kv_idx <= q_idx + right


class SlidingWindowAttention(MultiHeadAttention):
    """Multi-head self-attention restricted to ``left`` keys before and ``right`` keys after each
    query (``right=0``: causal sliding window, as Mistral/Longformer's local attention). Built on a
    ``mask_mod``: cost grows as L * (left + right), not L * L, on backends that skip empty tiles."""

    name = "sliding-window"
    description = "multi-head attention within a (left, right) window of each position (mask_mod)"

    def __init__(self, embed_dim: int, num_heads: int, *, left: int = 128, right: int = 0, **kw):
        super().__init__(embed_dim, num_heads, **kw)
        for argname, val in (("left", left), ("right", right)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{argname} must be a non-negative int, got {val!r}")
        self.left, self.right = left, right

    def attention_mods(self, N, L, S, **call_kwargs):
        super().attention_mods(N, L, S, **call_kwargs)
        return {"mask_mod": window_mask, "mod_args": (self.left, self.right)}

    @classmethod
    def example_params(cls, embed_dim=64, num_heads=8):
        return {"embed_dim": embed_dim, "num_heads": num_heads, "left": 64, "right": 0}


@hookimpl
def attention_variants():
    return [SlidingWindowAttention]
