"""``document``: block-diagonal attention over several sequences packed into one."""

from __future__ import annotations

import numpy as np

from engine import hookimpl

from .multi_head import MultiHeadAttention


def same_document(b, h, q_idx, kv_idx, doc_ids):
    """May attend only within the same document: doc_ids[b, q_idx] == doc_ids[b, kv_idx]."""
    return doc_ids[b, q_idx] == doc_ids[b, kv_idx]


def same_document_causal(b, h, q_idx, kv_idx, doc_ids):
    return kv_idx <= q_idx and doc_ids[b, q_idx] == doc_ids[b, kv_idx]


class DocumentAttention(MultiHeadAttention):
    """Multi-head self-attention over packed sequences: pass ``document_ids`` (N, L) integers with
    the call (``attn(x, document_ids=ids)``); a token attends only to tokens of its own document
    (and only earlier ones with ``causal=True``). Built on a ``mask_mod``, no dense mask."""

    name = "document"
    description = "block-diagonal attention for packed sequences, from per-token document ids (mask_mod)"

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, **kw):
        super().__init__(embed_dim, num_heads, **kw)
        self.causal = bool(causal)

    def __call__(self, query, key=None, value=None, *, document_ids=None, **kwargs):
        if key is not None or value is not None:
            raise ValueError("the 'document' variant is self-attention over packed sequences; pass only query")
        if document_ids is None:
            raise ValueError("the 'document' variant needs document_ids: (N, L) integers, one per token")
        return super().__call__(query, document_ids=document_ids, **kwargs)

    def attention_mods(self, N, L, S, document_ids=None, **call_kwargs):
        super().attention_mods(N, L, S, **call_kwargs)
        # device ids (torch CUDA, CuPy) stay where they are: the cuda kernel reads them in place
        place = self.input_placement(document_ids, "document_ids")
        ids = place.put(document_ids, what="document_ids")
        if ids.ndim == 1:
            ids = ids[None, ...]
        if not place.xp.isdtype(ids.dtype, "integral") or tuple(ids.shape) != (N, L):
            raise ValueError(
                f"document_ids must be integers of shape (N, L) = {(N, L)}, got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = place.put(ids, np.int64)
        if place.is_numpy:
            ids = np.ascontiguousarray(ids)
        mod = same_document_causal if self.causal else same_document
        return {"mask_mod": mod, "mod_args": (ids,)}

    def example_inputs(self, batch, length, key_length=None, rng=None):
        inputs = super().example_inputs(batch, length, rng=rng)
        # three documents of unequal length packed in every row
        inputs["document_ids"] = np.broadcast_to(
            np.searchsorted([length // 5, length // 2], np.arange(length), side="right"), (batch, length)
        ).copy()
        return inputs


@hookimpl
def attention_variants():
    return [DocumentAttention]
