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

    :param query: ``(..., Hq, L, E)``, float16, bfloat16, float32 or float64.
    :type query: array
    :param key: ``(..., H, S, E)``, the query's dtype.
    :type key: array
    :param attn_mask: as ``scaled_dot_product_attention``'s: boolean (True = may attend) or
        floating (added), broadcastable to ``(..., Hq, L, S)``, or a causal mask object.
    :type attn_mask: array | CausalBias | None
    :param is_causal: top-left causal mask.
    :type is_causal: bool
    :param scale: score scale; None is ``1/sqrt(E)``.
    :type scale: float | None
    :param enable_gqa: grouped-query attention (H divides Hq).
    :type enable_gqa: bool
    :param score_mod: as ``scaled_dot_product_attention``'s.
    :type score_mod: Callable | None
    :param mask_mod: as ``scaled_dot_product_attention``'s.
    :type mask_mod: Callable | None
    :param block_mask: as ``scaled_dot_product_attention``'s.
    :type block_mask: BlockMask | None
    :param mod_args: the mods' extra arguments.
    :type mod_args: tuple
    :return: the weights ``(..., Hq, L, S)``, a NumPy array of the query's dtype.
    :raises TypeError: an argument of the wrong kind, naming it (the forward's checks).
    :raises ValueError: a wrong shape or value, naming the argument and the shapes.
    """
    problem = validate_attention_args(
        query, key, key, attn_mask, is_causal, scale, enable_gqa, False, score_mod, mask_mod, block_mask, mod_args
    )
    if problem.on_device:
        raise TypeError("attention_weights takes host arrays (NumPy, torch CPU tensors); got device arrays")
    return attention_probabilities(problem)
