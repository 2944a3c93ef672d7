"""``engine.transformers``: the engine as an attention implementation of Hugging Face transformers.

After :func:`register`, any model whose attention goes through transformers' ``AttentionInterface``
(Llama, Mistral, Qwen, gpt-oss, ... : the models that accept ``attn_implementation="sdpa"``) runs
its attention through ``engine.torch.scaled_dot_product_attention`` when loaded or built with
``attn_implementation="attention_engine"``::

    import engine.transformers
    engine.transformers.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attention_engine")

Two registrations, both under the same name:

- ``AttentionInterface``: :func:`attention_forward`, which each attention layer calls with its
  query ``(B, Hq, L, D)``, key and value ``(B, H, S, D)`` (after RoPE and the cache update), the
  layer's mask and keywords.
- ``AttentionMaskInterface``: transformers' own ``sdpa_mask``, so the models build for this name the
  masks they build for ``"sdpa"``: boolean ``(B, 1, L, S)``, True = may attend (the engine's
  polarity), holding the padding, the causal rows and the layer's sliding window, or None where a
  causal flag suffices. Without a registered mask function transformers would build no mask at
  all for the name (no padding, no window).

The shapes and conventions are those of transformers' ``sdpa_attention_forward`` (read, not
copied): grouped-query attention through ``enable_gqa``, ``is_causal`` only for a mask-less call
with more than one query row (one row attends to its whole cache), ``scaling`` as the layer's,
``dropout`` applied whenever > 0 (the layers pass 0 in evaluation). What the engine adds: the
attention sinks of gpt-oss (``s_aux``, the layer's ``sinks``) join each row's softmax with their
gradient. Rows with no visible key (left padding) give zeros, as torch's SDPA.
"""

from __future__ import annotations

import torch

from .torch import scaled_dot_product_attention

__all__ = ["NAME", "register", "attention_forward"]

#: the name models select the engine by: ``attn_implementation="attention_engine"``
NAME = "attention_engine"


def register(name=NAME):
    """Add the engine to transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under
    ``name`` (for every model, as ``AttentionInterface.register`` does), so that
    ``from_pretrained(..., attn_implementation=name)``, ``from_config(...)`` and
    ``model.set_attn_implementation(name)`` select it. Calling it again is harmless.

    :param name: the implementation's name.
    :type name: str
    :return: ``name``.
    :raises ImportError: transformers is not installed (the ``transformers`` extra), or too old to
        have ``AttentionMaskInterface`` (before 4.53).
    :raises TypeError: ``name`` is not a non-empty str.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _sinks(module, kwargs):
    """gpt-oss's sinks: the ``s_aux`` keyword its layers pass, else the layer's ``sinks``
    parameter; None for models without."""
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) else None


def _window_mask(L: int, S: int, window: int, causal: bool, device) -> torch.Tensor:
    """``(L, S)`` bool for a layer's sliding window when the model passed no mask: key j is visible
    from row i at position p when ``p - window < j`` (transformers' ``sliding_window_overlay``) and,
    causal, ``j <= p``. Rows are aligned as the causal flag of a mask-less call aligns them: p = i
    (top left) for several rows, p = S - 1 for one row (a decoding step)."""
    pos = torch.arange(L, device=device)[:, None] + (S - 1 if L == 1 else 0)
    j = torch.arange(S, device=device)[None, :]
    keep = j > pos - window
    return keep & (j <= pos) if causal else keep


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """One attention layer's call from transformers (the ``AttentionInterface`` signature).

    :param module: the calling attention layer; read for ``is_causal`` (default True),
        ``sliding_window`` and ``sinks`` where the keywords do not give them.
    :type module: torch.nn.Module
    :param query: ``(B, Hq, L, D)``.
    :type query: torch.Tensor
    :param key: ``(B, H, S, D)``, H dividing Hq (grouped-query attention).
    :type key: torch.Tensor
    :param value: ``(B, H, S, Dv)``.
    :type value: torch.Tensor
    :param attention_mask: the model's mask: boolean ``(B, 1, L, S)`` (True = may attend) as
        ``sdpa_mask`` builds it, a float mask (added to the scores), or None. A mask longer than S
        along its last axis is cut to S.
    :type attention_mask: torch.Tensor | None
    :param dropout: the attention dropout probability, applied whenever > 0 (the layers pass 0 in
        evaluation); drawn from torch's default generator.
    :type dropout: float
    :param scaling: the score scale; None is ``1/sqrt(D)``.
    :type scaling: float | None
    :param is_causal: None reads ``module.is_causal``; applied only when ``attention_mask`` is None
        and L > 1.
    :type is_causal: bool | None
    :param kwargs: the layer's other keywords: ``s_aux`` (gpt-oss's sinks, ``(Hq,)``) and
        ``sliding_window`` (applied only to a mask-less call, whose mask would otherwise hold it);
        ``softcap`` and ``position_bias`` are refused; the rest (position ids, cache positions) are
        not needed.
    :type kwargs: dict
    :return: ``(out, None)``: ``out`` ``(B, L, Hq, Dv)`` (transformers' layout after attention),
        and no attention weights (never materialised).
    :raises ValueError: ``softcap`` or ``position_bias`` given (this integration does not take
        them: use ``"eager"``); bad shapes, from the engine.
    :raises TypeError: a mask that is neither a tensor nor None (a flex ``BlockMask``).
    """
    for name in ("softcap", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={NAME!r} does not support {name}: use 'eager' for this model")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a tensor or None, got {type(attention_mask).__name__} (a mask built "
            f"for another attn_implementation? register() makes models build sdpa's masks for {NAME!r})"
        )
    L, S = query.shape[-2], key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.shape[-1] > S:
        mask = mask[..., :S]
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if mask is None and isinstance(window, int) and 0 < window < S:
        mask, causal = _window_mask(L, S, window, bool(causal), query.device), False
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=float(dropout),
        is_causal=bool(causal) and mask is None and L > 1,
        scale=scaling,
        enable_gqa=query.shape[-3] != key.shape[-3],
        sinks=_sinks(module, kwargs),
    )
    return out.transpose(1, 2).contiguous(), None
