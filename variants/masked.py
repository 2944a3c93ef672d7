"""``masked``: causal self-attention of a decoder, with key padding."""

from __future__ import annotations

from engine import hookimpl

from .multi_head import MultiHeadAttention


class MaskedSelfAttention(MultiHeadAttention):
    """Multi-head self-attention where position i sees only positions j <= i (always causal).

    ``key_padding_mask`` (N, L) (True = padding, ignored) and ``attn_mask`` combine with the
    causal mask. Equivalent to ``nn.MultiheadAttention`` with ``attn_mask`` =
    ``triu(ones(L, L), 1).bool()``.
    """

    name = "masked"
    description = "causal (decoder) multi-head self-attention with key padding"

    def __call__(self, query, key=None, value=None, **kwargs):
        if key is not None or value is not None:
            raise ValueError("the 'masked' variant is self-attention; pass only query")
        kwargs["is_causal"] = True
        return super().__call__(query, **kwargs)


@hookimpl
def attention_variants():
    return [MaskedSelfAttention]
