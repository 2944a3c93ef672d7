"""Lay out an ``attn_mask`` for the tiled kernels without materialising the broadcast."""

from __future__ import annotations

import math

import numpy as np

from .arrays import HOST, Placement, is_floating
from .attention import AttentionProblem

__all__ = ["kernel_mask", "reduce_to_shape", "mha_masks_to_sdpa"]


def kernel_mask(problem: AttentionProblem, xp=np):
    """Return ``(mask4, batch_index)`` for a problem that has a mask.

    ``mask4`` has shape ``(Bm, Hq, L, S)`` where ``Bm`` is the product of the mask's own leading
    dims; the head, row and column axes are zero-stride views where the mask broadcasts, so memory
    stays that of the mask the caller passed. ``batch_index[b]`` (int64, length ``problem.batch``)
    is the ``mask4`` row serving flattened batch entry ``b``. Boolean masks keep their dtype
    (True = may attend); float masks are cast to the problem's dtype. ``xp`` is ``numpy`` or a
    NumPy-compatible device module (CuPy).
    """
    m = problem.attn_mask
    if problem.mask_kind == "float" and m.dtype != problem.dtype:
        m = m.astype(problem.dtype)
    nb = len(problem.batch_shape)
    full = problem.batch_shape + (problem.num_q_heads, problem.L, problem.S)
    m = m.reshape((1,) * (len(full) - m.ndim) + tuple(m.shape))
    lead = tuple(m.shape[:nb])
    m3 = m.reshape((math.prod(lead),) + tuple(m.shape[nb:]))
    index = np.broadcast_to(np.arange(math.prod(lead), dtype=np.int64).reshape(lead), problem.batch_shape).reshape(-1)
    mask4 = xp.broadcast_to(m3, (m3.shape[0], problem.num_q_heads, problem.L, problem.S))
    return mask4, np.ascontiguousarray(index)


def reduce_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """The gradient of an array of ``shape`` that was broadcast to ``grad.shape``: ``grad`` summed
    over the leading dimensions ``shape`` lacks and over those where ``shape`` has 1, in float64
    (NumPy's summation order is fixed, so the result is deterministic)."""
    grad = np.asarray(grad, dtype=np.float64)
    lead = grad.ndim - len(shape)
    if lead:
        grad = grad.sum(axis=tuple(range(lead)))
    axes = tuple(a for a, (n, m) in enumerate(zip(shape, grad.shape)) if n == 1 and m != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def mha_masks_to_sdpa(
    attn_mask, key_padding_mask, is_causal: bool, N: int, H: int, L: int, S: int, dtype, place: Placement = HOST
):
    """Turn ``nn.MultiheadAttention`` masks into one ``scaled_dot_product_attention`` mask.

    MHA polarity: boolean True = **not allowed**, float = added. ``attn_mask`` is (L, S) or
    (N * H, L, S); ``key_padding_mask`` is (N, S). Returns ``(mask, is_causal)`` for the
    functional API (boolean True = may attend, or float), broadcastable to (N, H, L, S) without
    materialising more than the inputs' own broadcast. ``is_causal`` stays a flag (the fast path)
    when no other mask is given, and is folded into the mask otherwise. The mask is an array of
    ``place`` (NumPy by default; masks given elsewhere are copied there).

    :param attn_mask: MHA's ``attn_mask``: ``(L, S)`` or ``(N * H, L, S)``, boolean (True = not
        allowed) or float (added); or None.
    :type attn_mask: array | None
    :param key_padding_mask: ``(N, S)``, boolean (True = padding, not allowed) or float; or None.
    :type key_padding_mask: array | None
    :param is_causal: MHA's causal flag (a hint in torch; applied here).
    :param N: batch size.
    :param H: number of heads.
    :param L: query length.
    :param S: key length.
    :param dtype: the dtype of a float mask returned.
    :type dtype: numpy.dtype
    :param place: where the mask lives (``Variant.placement_of``); NumPy by default.
    :return: ``(mask, is_causal)`` for ``scaled_dot_product_attention``.
    :raises ValueError: a mask of the wrong shape, naming it and the shapes expected.
    """
    xp = place.xp
    parts = []
    if attn_mask is not None:
        attn_mask = _mha_mask_array(attn_mask, "attn_mask", place)
        if tuple(attn_mask.shape) == (L, S):
            parts.append(xp.reshape(attn_mask, (1, 1, L, S)))
        elif tuple(attn_mask.shape) == (N * H, L, S):
            parts.append(xp.reshape(attn_mask, (N, H, L, S)))
        else:
            raise ValueError(
                f"attn_mask must have shape (L, S) = {(L, S)} or (N * num_heads, L, S) = "
                f"{(N * H, L, S)}, got {tuple(attn_mask.shape)}"
            )
    if key_padding_mask is not None:
        key_padding_mask = _mha_mask_array(key_padding_mask, "key_padding_mask", place)
        if tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"key_padding_mask must have shape (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}")
        parts.append(xp.reshape(key_padding_mask, (N, 1, 1, S)))
    if not parts:
        return None, bool(is_causal)
    if is_causal:  # MHA polarity: True = blocked
        parts.append(place.put(np.triu(np.ones((L, S), dtype=bool), k=1)))
    if all(_is_bool(p, xp) for p in parts):
        blocked = parts[0]
        for p in parts[1:]:
            blocked = blocked | p
        return ~blocked, False
    blocked_score, zero = place.put(np.asarray(-np.inf, dtype)), place.put(np.asarray(0, dtype))
    total = None
    for p in parts:
        term = xp.where(p, blocked_score, zero) if _is_bool(p, xp) else place.put(p, dtype)
        total = term if total is None else total + term
    return total, False


def _is_bool(mask, xp) -> bool:
    # NumPy's isdtype does not know ml_dtypes' bfloat16: NumPy arrays are asked directly
    return mask.dtype == np.bool_ if isinstance(mask, np.ndarray) else xp.isdtype(mask.dtype, "bool")


def _mha_mask_array(mask, name: str, place: Placement):
    from .causal import as_causal_bias

    if as_causal_bias(mask) is not None:  # as nn.MultiheadAttention, which takes tensors only
        raise TypeError(
            f"{name} is a causal mask object ({type(mask).__name__}); variants take boolean or "
            "floating arrays (as nn.MultiheadAttention). Pass is_causal=True for top-left causal, "
            "or the mask as an array; engine.scaled_dot_product_attention takes the object itself"
        )
    mask = place.put(mask, what=name)
    if isinstance(mask, np.ndarray):  # NumPy's isdtype does not know ml_dtypes' bfloat16
        ok = mask.dtype == np.bool_ or is_floating(mask.dtype)
    else:
        ok = place.xp.isdtype(mask.dtype, "bool") or place.xp.isdtype(mask.dtype, "real floating")
    if not ok:
        raise TypeError(
            f"{name} must be boolean (True = not allowed) or floating (added), got dtype "
            f"{mask.dtype} with shape {tuple(mask.shape)}"
        )
    return mask
