"""The backward problem (``scaled_dot_product_attention_backward``): the forward's checks, then
``grad_out``, ``out``, ``lse``, ``grad_lse``, the score_mod's derivative and the ``mod_args`` that
take a gradient; and :class:`Gradients`, what a backend's backward op returns."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from .arrays import as_array, check_float, is_device_array
from .attention import AttentionProblem, BackwardProblem, validate_attention_args
from .base import check_bool
from .mod_args_grad import mod_args_grad_step, mod_args_marks
from .mods import score_mod_grad

__all__ = ["validate_backward_args", "Gradients"]


class Gradients(NamedTuple):
    """What a backward op returns: ``dq``, ``dk``, ``dv`` in the shapes and dtypes of query, key
    and value; ``dmask``, the float mask's gradient in its shape and dtype (None unless
    ``return_mask_grad``); ``dmod_args``, a tuple with one entry per ``mod_args`` entry, the
    gradient in the shape and dtype of each marked array and None for the others (None unless
    some are marked). Build it by keyword: fields may be added (with default None)."""

    dq: Any
    dk: Any
    dv: Any
    dmask: Any = None
    dmod_args: Any = None


def validate_backward_args(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
    dropout_p=0.0,
    dropout_seed=None,
    return_mask_grad=False,
    grad_lse=None,
    return_mod_args_grad=False,
    sinks=None,
) -> BackwardProblem:
    """Check every argument of ``scaled_dot_product_attention_backward``: the forward's
    arguments (same checks, same messages), then ``grad_out``/``out`` (the forward's output
    shape and dtype), ``lse`` and ``grad_lse`` (the output shape without its last axis), the
    mods' derivative and the ``mod_args`` marked for a gradient (and their per-score step).

    Raises ``TypeError``/``ValueError`` naming the argument and shapes; never touches a kernel.
    """
    problem = validate_attention_args(
        query,
        key,
        value,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        False,
        score_mod,
        mask_mod,
        block_mask,
        mod_args,
        dropout_p,
        dropout_seed,
        draw_seed=False,
        sinks=sinks,
    )
    arrays = {"grad_lse": None}
    for name, x, shape in (
        ("grad_out", grad_out, problem.out_shape),
        ("out", out, problem.out_shape),
        ("lse", lse, problem.lse_shape),
        ("grad_lse", grad_lse, problem.lse_shape),
    ):
        if x is None and name == "grad_lse":
            continue
        arr = as_array(x, name)
        if is_device_array(arr) != problem.on_device:
            raise TypeError(f"{name} must live where query does (host or device)")
        dtype = check_float(arr, name)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have shape {tuple(shape)} (from query {tuple(problem.query.shape)} "
                f"and value {tuple(problem.value.shape)}), got {tuple(arr.shape)}"
            )
        if name in ("grad_out", "out") and dtype != problem.dtype:
            raise TypeError(f"{name} must have the dtype of query ({problem.dtype}), got {dtype}")
        if name in ("lse", "grad_lse") and np.dtype(dtype).itemsize < problem.dtype.itemsize:
            raise TypeError(f"{name} must be at least as precise as query ({problem.dtype}), got {dtype}")
        arrays[name] = arr
    return_mask_grad = check_bool(return_mask_grad, "return_mask_grad")
    if return_mask_grad and problem.mask_kind != "float":
        raise ValueError(
            "return_mask_grad=True needs a floating attn_mask (a boolean mask or no mask "
            f"has no gradient), got {'no mask' if attn_mask is None else 'a boolean mask'}"
        )
    score_grad = None
    if problem.score_mod is not None:
        score_grad = score_mod_grad(score_mod, problem)
    marks = mod_args_marks(return_mod_args_grad, problem.mod_args)
    arg_grad = None
    if marks and problem.score_mod is not None:
        arg_grad = mod_args_grad_step(problem, marks)
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(AttentionProblem)}
    return BackwardProblem(
        **dict(fields, needs_backward=True),
        grad_out=arrays["grad_out"],
        out=arrays["out"],
        lse=arrays["lse"],
        return_mask_grad=return_mask_grad,
        score_grad=score_grad,
        grad_lse=arrays["grad_lse"],
        mod_args_grad=marks,
        arg_grad=arg_grad,
    )
