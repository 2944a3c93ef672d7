"""``attention_weights``: the attention probabilities themselves, materialised (what
``need_weights=True`` returns, and what a heat map shows)."""

from __future__ import annotations

from .backends.reference.dense import attention_probabilities
from .problems.attention import validate_attention_args

__all__ = ["attention_weights"]


def attention_weights(
    query,
    key,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
):
    """``softmax(scale * query @ key.T + mask)``: the weights ``scaled_dot_product_attention``
    applies to the values, with its semantics (masks, causal, GQA, mods; no dropout).

    Shapes ``(..., Hq, L, E)`` and ``(..., H, S, E)`` -> ``(..., Hq, L, S)``, in the query's dtype,
    computed in float64 by the ``reference`` backend's arithmetic. This materialises L x S per head
    (the attention functions never do): for inspection, plots and ``need_weights=True``. Rows with
    no visible key are zeros. Host arrays only (NumPy, torch CPU tensors); the result is NumPy.

    :raises TypeError: an argument of the wrong kind, naming it (the forward's checks).
    :raises ValueError: a wrong shape or value, naming the argument and the shapes.
    """
    problem = validate_attention_args(
        query, key, key, attn_mask, is_causal, scale, enable_gqa, False, score_mod, mask_mod, block_mask, mod_args
    )
    if problem.on_device:
        raise TypeError("attention_weights takes host arrays (NumPy, torch CPU tensors); got device arrays")
    return attention_probabilities(problem)
