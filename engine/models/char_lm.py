"""A small decoder-only character-level transformer language model (GPT-style, pre-norm).

Each block is ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; the attention layer has
``nn.MultiheadAttention``'s parameter names (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``), so the same ``state_dict`` loads into both attentions:

- ``attention="torch"``: the projections in torch, then ``F.scaled_dot_product_attention``
  (``is_causal=True``); with ``alibi=True``, torch's math path with the ALiBi bias (and the causal
  mask) as an explicit ``(heads, L, L)`` float tensor.
- ``attention="engine"``: the engine's ``masked`` (causal) or ``alibi`` variant as a module
  (``engine.torch.as_module``): projections in torch, attention by the engine's kernels, ALiBi as a
  ``score_mod`` (no L x L bias exists).

``position="t5"`` (:class:`T5BiasSelfAttention`): T5's learned relative-position bias, a table of
``heads x buckets`` per layer (Raffel et al., 2020), with the attention by torch's math path and
the bias gathered into a dense ``(heads, L, L)`` float mask, or by the engine with the bias a
``score_mod`` reading the table (``engine.models.relative_bias.bucketed_relative_bias``), whose
gradient the engine computes (``mod_args`` gradients): no L x L array exists.

Positions are learned embeddings (``"learned"``), or none with ALiBi (Press et al., 2022) or T5's
bias, which carry the positions themselves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharLM", "TorchCausalSelfAttention", "T5BiasSelfAttention", "ATTENTIONS", "POSITIONS"]

ATTENTIONS = ("torch", "engine")
POSITIONS = ("learned", "alibi", "t5")
#: T5's defaults for a decoder (unidirectional buckets)
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128


class TorchCausalSelfAttention(nn.Module):
    """Causal multi-head self-attention on torch's SDPA, with ``nn.MultiheadAttention``'s
    parameters and initialisation."""

    def __init__(self, d_model: int, n_heads: int, alibi: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.alibi = alibi
        if alibi:
            from variants.alibi import alibi_slopes

            self.register_buffer("slopes", torch.from_numpy(alibi_slopes(n_heads)), persistent=False)

    def forward(self, x):
        N, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(N, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.alibi:
            i = torch.arange(L)[:, None]
            j = torch.arange(L)[None, :]
            bias = -self.slopes.to(x.dtype)[:, None, None] * (i - j).abs().to(x.dtype)
            bias = bias.masked_fill(j > i, -math.inf)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(N, L, D))


class T5BiasSelfAttention(nn.Module):
    """Causal multi-head self-attention with T5's learned relative-position bias: the parameters
    of :class:`TorchCausalSelfAttention` plus ``relative_bias`` ``(heads, buckets)``, computed by
    torch (``attention="torch"``: the bias gathered into an ``(heads, L, L)`` float mask, torch's
    math path) or by the engine (``attention="engine"``: the bias a ``score_mod`` reading the
    table, differentiated by the engine)."""

    def __init__(self, d_model: int, n_heads: int, attention: str):
        super().__init__()
        self.n_heads, self.attention = n_heads, attention
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.relative_bias = nn.Parameter(torch.empty(n_heads, T5_BUCKETS))
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.zeros_(self.relative_bias)  # what the plot shows was learned, from nothing
        self._buckets = {}

    def buckets(self, L: int) -> np.ndarray:
        """The bucket of every distance ``q_idx - kv_idx + L - 1`` (int64, memoised per L)."""
        if L not in self._buckets:
            from .relative_bias import relative_position_buckets

            self._buckets[L] = relative_position_buckets(L, L, T5_BUCKETS, T5_MAX_DISTANCE)
        return self._buckets[L]

    def forward(self, x):
        from .relative_bias import bucketed_relative_bias, dense_bias

        N, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(N, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        table = self.relative_bias.to(x.dtype)
        if self.attention == "engine":
            import engine.torch as et

            y = et.scaled_dot_product_attention(
                q, k, v, is_causal=True, score_mod=bucketed_relative_bias, mod_args=(table, self.buckets(L), L - 1)
            )
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            bias = dense_bias(table, self.buckets(L), L, L)
            bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(y.transpose(1, 2).reshape(N, L, D))


def _engine_attention(d_model: int, n_heads: int, alibi: bool) -> nn.Module:
    import engine
    import engine.torch as et

    # parameters are replaced by the shared initial state_dict; dtype follows the module's
    return et.as_module(
        engine.get_variant("alibi" if alibi else "masked", embed_dim=d_model, num_heads=n_heads, seed=0)
    )


class _Block(nn.Module):
    def __init__(self, d_model, n_heads, attention, position):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        alibi = position == "alibi"
        if position == "t5":
            self.attn = T5BiasSelfAttention(d_model, n_heads, attention)
        elif attention == "torch":
            self.attn = TorchCausalSelfAttention(d_model, n_heads, alibi)
        else:
            self.attn = _engine_attention(d_model, n_heads, alibi)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        a = self.attn(self.ln1(x))
        x = x + (a[0] if isinstance(a, tuple) else a)  # variants return (output, weights)
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Token ids ``(N, L)`` (int64) -> next-token logits ``(N, L, vocab_size)``.

    :param attention: ``"torch"`` or ``"engine"`` (see the module docstring).
    :param alibi: ALiBi biases instead of learned position embeddings (``position="alibi"``).
    :param position: ``"learned"`` embeddings, ``"alibi"`` or ``"t5"`` (a learned relative bias);
        overrides ``alibi`` when given.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        context: int = 64,
        attention: str = "torch",
        alibi: bool = False,
        position: str | None = None,
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        position = position or ("alibi" if alibi else "learned")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model) if position == "learned" else None
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, attention, position) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx):
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def encode(text: str) -> tuple[np.ndarray, list[str]]:
    """Character ids of ``text`` (int64) and the sorted vocabulary."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text)), vocab
