"""Attention sinks: one learnable logit per query head that joins the softmax and carries no value
(gpt-oss; "Efficient Streaming Language Models with Attention Sinks", Xiao et al. 2023; the
``s_aux`` of transformers' gpt-oss and FlashAttention's ``learnable_sink``).

With the scaled, masked scores ``x_j`` of a row of query head h and the sink ``s_h`` (in the units
of the scaled scores, added after the scale as gpt-oss's eager attention does)::

    p_j = exp(x_j) / (sum_k exp(x_k) + exp(s_h)),    out = sum_j p_j v_j

No kernel needs the sink. With ``(out, lse)`` of the same attention without it::

    lse' = logaddexp(lse, s_h),    out' = out * exp(lse - lse')

(the softmax's denominator gains ``exp(s_h)``; every weight shrinks by the same factor). A row
with no visible key has ``lse = -inf``: ``out' = 0`` and ``lse' = s_h`` (the sink takes all the
weight and carries no value), which is what gpt-oss's eager formula gives. Split-KV merges its
partial results before this step, so the sink is counted once.

The backward needs no kernel change either. FlashAttention-2's backward, given ``(out', lse')``,
recomputes ``P' = exp(S - lse')``, the weights with the sink, and ``D' = rowsum(dO * out')``, and
``dS = P' * (dP - D')`` is the softmax's derivative with the sink column included (the derivative
of ``p_j`` with respect to ``x_k`` is ``p_j (delta_jk - p_k)`` whatever other columns there are).
The sink's own gradient is that derivative at its column: ``d lse'/d s_h = exp(s_h - lse')``, so::

    dsinks[h] = -sum over the rows of head h of exp(s_h - lse'_i) * D'_i

This module holds the check of ``sinks=`` and both vectorised O(rows) steps, which every backend
gets through the public functions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .arrays import as_array, check_float, is_device_array

__all__ = ["validate_sinks", "add_sinks", "sinks_grad", "widen_for_sinks", "run_with_sinks"]


def validate_sinks(sinks, num_q_heads: int):
    """``sinks`` as a NumPy array of shape ``(num_q_heads,)`` in its own floating dtype, or None.

    :raises TypeError: a device array (the sink step runs on host arrays) or a non-floating dtype.
    :raises ValueError: a wrong shape, or a NaN or +inf entry (-inf is allowed: no sink for that
        head).
    """
    if sinks is None:
        return None
    arr = as_array(sinks, "sinks")
    if is_device_array(arr):
        raise TypeError("sinks must be a host array (NumPy, a torch CPU tensor), got a device array")
    check_float(arr, "sinks")
    if tuple(arr.shape) != (num_q_heads,):
        raise ValueError(f"sinks must have shape (Hq,) = ({num_q_heads},), one per query head, got {tuple(arr.shape)}")
    s = np.asarray(arr, dtype=np.float64)
    bad = np.nonzero(np.isnan(s) | (s == np.inf))[0]
    if bad.size:
        h = int(bad[0])
        raise ValueError(f"sinks must be finite or -inf (no sink), got sinks[{h}] = {s[h]}")
    return np.array(arr)  # a copy: the caller may change theirs


def _per_head(sinks: np.ndarray, shape: tuple, head_axis: int | None) -> np.ndarray:
    """The sinks in float64, shaped to broadcast along ``head_axis`` of an array of ``shape``
    (None: one head with no axis of its own, as 2-D attention inputs)."""
    s = np.asarray(sinks, dtype=np.float64)
    if head_axis is None:
        return s.reshape(())
    view = [1] * len(shape)
    view[head_axis] = s.shape[0]
    return s.reshape(view)


def add_sinks(out: np.ndarray, lse: np.ndarray, sinks: np.ndarray, head_axis: int | None):
    """``(out', lse')``: the result of attention without the sinks turned into the result with them
    (the module's formula). ``lse`` has the shape of ``out`` without its last axis and its head
    axis at ``head_axis`` (None: 2-D attention, one head and one sink). ``out`` is scaled in place
    when it is writeable and owns its memory (the backends' fresh results)."""
    lse64 = np.asarray(lse, dtype=np.float64)
    s = _per_head(sinks, lse64.shape, head_axis)
    new = np.logaddexp(lse64, s)
    with np.errstate(invalid="ignore"):
        factor = np.exp(lse64 - new)
    factor = np.where(np.isneginf(new), 0.0, factor)  # no key and no sink: out is 0 already
    factor = factor.astype(out.dtype)[..., None]
    if out.flags.writeable and out.flags.owndata:
        np.multiply(out, factor, out=out)
    else:
        out = out * factor
    return out, new.astype(lse.dtype)


def sinks_grad(grad_out, out, lse, sinks: np.ndarray, head_axis: int | None, grad_lse=None) -> np.ndarray:
    """``dsinks`` (Hq,) in the sinks' dtype, from the forward's ``out'``/``lse'`` (with the sinks)
    and ``grad_out``: ``sum_i exp(s_h - lse'_i) * (grad_lse_i - rowsum(dO * out')_i)`` over the
    rows of head h (``grad_lse``: the loss's gradient with respect to ``lse'``, None for zero; d
    lse'_i / d s_h is the sink's weight). A row whose ``lse'`` is -inf (no key and a -inf sink)
    contributes nothing."""
    lse64 = np.asarray(lse, dtype=np.float64)
    d = np.einsum("...e,...e->...", np.asarray(grad_out, dtype=np.float64), np.asarray(out, dtype=np.float64))
    s = _per_head(sinks, lse64.shape, head_axis)
    with np.errstate(invalid="ignore", over="ignore"):
        p_sink = np.where(np.isneginf(lse64), 0.0, np.exp(s - lse64))
    if grad_lse is not None:
        d = d - np.asarray(grad_lse, dtype=np.float64)
    contrib = p_sink * d
    if head_axis is None:
        total = contrib.sum().reshape(1)
    else:
        axes = tuple(a for a in range(contrib.ndim) if a != head_axis % contrib.ndim)
        total = contrib.sum(axis=axes).reshape(-1)
    return (-total).astype(sinks.dtype)


_WIDE_FIELDS = ("query", "key", "value", "attn_mask")


def widen_for_sinks(problem):
    """A 16-bit problem with sinks as the same problem in float32 (the sink step needs the float32
    log-sum-exp: a bfloat16 lse of 10 is known to 0.03, which would move out' by 3%); the public
    functions round the result once. Other problems come back unchanged."""
    if problem.sinks is None or problem.dtype.itemsize != 2:
        return problem
    f32 = np.dtype(np.float32)
    changes = {"dtype": f32}
    for name in _WIDE_FIELDS:
        a = getattr(problem, name, None)
        if a is not None and a.dtype.itemsize == 2 and a.dtype.kind != "b":
            changes[name] = np.asarray(a).astype(f32)
    return dataclasses.replace(problem, **changes)


def run_with_sinks(problem, run, head_axis: int | None):
    """``run(problem) -> (out, lse)``, with the problem's sinks applied to the result (16-bit
    problems computed in float32 and rounded once after the sink step). Without sinks: ``run``."""
    if problem.sinks is None:
        return run(problem)
    wide = widen_for_sinks(problem)
    out, lse = run(wide)
    out, lse = add_sinks(np.asarray(out), np.asarray(lse), problem.sinks, head_axis)
    if wide is not problem:  # a float32 lse stays so where the caller asked (engine.torch's backward needs it)
        out = out.astype(problem.dtype)
        lse = lse if getattr(problem, "lse_float32", False) else lse.astype(problem.dtype)
    return out, lse
