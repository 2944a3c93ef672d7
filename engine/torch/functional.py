"""``engine.torch.scaled_dot_product_attention``: torch's signature and the engine's keywords in
front of the custom operators (``engine.torch.ops``)."""

from __future__ import annotations

import numpy as np
import torch

from ..problems.arrays import refuse_masked_array
from ..problems.attention import validate_dropout
from ..problems.base import check_bool, check_scale
from ..problems.causal import as_causal_bias
from .calls import config_key, split_mod_args
from .convert import check_real_data
from .ops import attention

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
    backend="auto",
    return_lse=False,
    sinks=None,
):
    """``torch.nn.functional.scaled_dot_product_attention`` computed by the engine, differentiable.

    Arguments as torch's: tensors ``(..., Hq, L, E)``, ``(..., H, S, E)``, ``(..., H, S, Ev)``,
    ``attn_mask`` boolean (True = may attend), floating (added; it gets a gradient when it
    requires one), or a causal bias (``engine.causal_lower_right``/``causal_upper_left`` or
    torch's ``torch.nn.attention.bias.causal_lower_right``/``causal_upper_left``: a causal
    flag, no L x S mask), ``dropout_p`` applied whenever > 0 (as torch's functional; pass 0 in
    evaluation), ``is_causal`` top-left, ``scale``, ``enable_gqa``. The engine's keywords
    ``score_mod``, ``mask_mod``, ``block_mask``, ``mod_args`` and ``backend`` are those of
    ``engine.scaled_dot_product_attention``; a score_mod's derivative is its declared one or
    found automatically (see ``docs/training.md``).

    ``mod_args``: float tensors that require grad get their gradient (a learned bias table,
    slopes...: every element the score_mod reads, differentiated by complex step, summed
    deterministically); integer tensors, NumPy arrays and numbers sit beside them and get none.
    Numbers (and the mods) are constants of a ``torch.compile`` graph.

    ``sinks`` (gpt-oss's attention sinks, ``(Hq,)``) join every row's softmax without a value; a
    sinks tensor that requires grad gets its gradient (``engine.problems.sinks``).

    The dropout seed is drawn from torch's default generator (``torch.manual_seed`` repeats it)
    and handed to the backward, which regenerates the same dropped weights.

    The work is one torch custom operator per direction (``attention_engine::attention_forward``
    and ``attention_backward``), so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one
    opaque op. Not twice differentiable.

    :param query: ``(..., Hq, L, E)``, CPU or CUDA, float16, bfloat16, float32 or float64.
    :type query: torch.Tensor
    :param key: ``(..., H, S, E)``, the query's dtype and device.
    :type key: torch.Tensor
    :param value: ``(..., H, S, Ev)``, the query's dtype and device.
    :type value: torch.Tensor
    :param attn_mask: boolean (True = may attend) or floating (added; it gets a gradient when it
        requires one), broadcastable to ``(..., Hq, L, S)``; or a causal mask object (torch's
        ``causal_lower_right``/``causal_upper_left``, ``engine.causal_lower_right``), mapped to the
        engine's causal kinds.
    :type attn_mask: torch.Tensor | CausalBias | None
    :param dropout_p: applied whenever > 0, as torch's functional (pass 0 in evaluation).
    :type dropout_p: float
    :param is_causal: top-left causal, as torch.
    :type is_causal: bool
    :param scale: None is ``1/sqrt(E)``.
    :type scale: float | None
    :param enable_gqa: grouped-query attention, as torch.
    :type enable_gqa: bool
    :param score_mod: as ``engine.scaled_dot_product_attention``'s; its derivative is declared or
        found automatically.
    :type score_mod: Callable | None
    :param mask_mod: as ``engine.scaled_dot_product_attention``'s.
    :type mask_mod: Callable | None
    :param block_mask: as ``engine.scaled_dot_product_attention``'s.
    :type block_mask: BlockMask | None
    :param mod_args: the mods' extra arguments: tensors, NumPy arrays and numbers; float tensors
        that require grad get their gradient.
    :type mod_args: tuple
    :param backend: ``"auto"`` or a backend name.
    :type backend: str
    :param return_lse: also return the log-sum-exp of the scaled, masked scores ``(..., Hq, L)``
        (float32 for 16-bit inputs, else the inputs' dtype), through which a loss may
        differentiate too (merges of partial attention, z-losses).
    :type return_lse: bool
    :param sinks: attention sinks (gpt-oss, StreamingLLM): a float tensor ``(Hq,)`` on the CPU, one
        logit per query head in the units of the scaled scores, that joins each row's softmax and
        carries no value, as ``engine.scaled_dot_product_attention``'s ``sinks``; ``lse`` then
        includes it. It gets its gradient when it requires one (a ``torch.nn.Parameter``). With
        CUDA inputs: ``engine.NotSupportedError`` (the engine applies sinks to host results).
    :type sinks: torch.Tensor | None
    :return: a tensor ``(..., Hq, L, Ev)`` of the inputs' dtype on their device, or ``(out, lse)``.
    :raises TypeError: an argument of the wrong kind, as the engine's forward; a tensor subclass
        whose data is not in its own storage (DTensor, a fake tensor), naming it.
    :raises ValueError: bad shapes or values, as the engine's forward; a tensor that requires grad
        among ``mod_args`` that cannot have one (0-d: pass a 1-element tensor and read ``t[0]``);
        ``sinks`` on another device than the query.
    :raises engine.NotSupportedError: a gradient is needed and no backend with a backward pass can
        run the inputs (e.g. float64 CUDA tensors, which the ``cuda`` backend does not take).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_real_data(t, name)
    is_causal = check_bool(is_causal, "is_causal")
    enable_gqa = check_bool(enable_gqa, "enable_gqa")
    return_lse = check_bool(return_lse, "return_lse")
    p, _ = validate_dropout(dropout_p, None, True)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    causal_offset = 0
    bias = None if attn_mask is None else as_causal_bias(attn_mask)
    if bias is not None:  # a causal flag with its diagonal offset; a CausalBias is no op input
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as torch)")
        L, S = query.shape[-2], key.shape[-2]
        if bias.shape != (L, S):
            raise ValueError(
                f"attn_mask {bias!r} is for (L, S) = {bias.shape}, but the inputs have (L, S) = ({L}, {S})"
            )
        attn_mask, is_causal, causal_offset = None, True, bias.diagonal_offset
    elif attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        refuse_masked_array(attn_mask, "attn_mask")
        attn_mask = torch.as_tensor(np.asarray(attn_mask))
    elif attn_mask is not None:
        check_real_data(attn_mask, "attn_mask")
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        refuse_masked_array(sinks, "sinks")
        sinks = torch.as_tensor(np.asarray(sinks))
    elif sinks is not None:
        check_real_data(sinks, "sinks")
        if sinks.device != query.device:
            raise ValueError(f"sinks must be on the query's device ({query.device}), got {sinks.device}")
    tensors, positions, statics = split_mod_args(mod_args)
    inputs = (query, key, value, *(t for t in (attn_mask, sinks) if t is not None), *tensors)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64) if p > 0 else None
    config = config_key(score_mod, mask_mod, block_mask, positions, statics, backend)
    out, lse = attention(
        query,
        key,
        value,
        attn_mask,
        sinks,
        tensors,
        seed,
        p,
        is_causal,
        causal_offset,
        None if scale is None else check_scale(scale, query.shape[-1], ""),
        enable_gqa,
        config,
        needs_grad,
    )
    return (out, lse) if return_lse else out
