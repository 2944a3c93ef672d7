"""``scaled_dot_product_attention_backward``: the gradients of the attention function.

Layered as the forward: validation (``engine.problems.attention``), dispatch (``engine.dispatch``), the
backend's backward op and its kernel (``engine.kernels.cpu.flash_bwd`` for ``cpu``).
"""

from __future__ import annotations

import numpy as np

from .backends.base import empty_gradients
from .dispatch import select_backend
from .problems.attention import BackwardProblem
from .problems.backward import Gradients, validate_backward_args
from .problems.base import check_bool
from .problems.masks import reduce_to_shape
from .problems.sinks import sinks_grad

__all__ = ["scaled_dot_product_attention_backward", "run_backward", "backward_sinks_grad"]


def scaled_dot_product_attention_backward(
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
    *,
    backend="auto",
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
    return_sinks_grad=False,
):
    """Gradients of :func:`engine.scaled_dot_product_attention` with respect to its inputs.

    Pass the forward's arguments unchanged, with ``out`` and ``lse`` from the forward
    (``return_lse=True``) and ``grad_out``, the gradient of the loss with respect to ``out``
    (shape ``(..., Hq, L, Ev)``, the dtype of ``query``). The ``cpu`` and ``cuda`` backends
    recompute the attention weights tile by tile from ``lse`` (FlashAttention-2's backward, Dao
    2023), so their memory stays linear in L; ``reference`` recomputes everything densely in
    float64.

    :param grad_out: the gradient of the loss with respect to ``out``, ``(..., Hq, L, Ev)``, the
        query's dtype.
    :type grad_out: array
    :param query: ``(..., Hq, L, E)``: float16, bfloat16, float32 or float64 (the output's dtype).
    :type query: array
    :param key: ``(..., H, S, E)``, the query's dtype; its leading dims broadcast with the query's.
    :type key: array
    :param value: ``(..., H, S, Ev)``, the query's dtype.
    :type value: array
    :param out: the forward's output, ``(..., Hq, L, Ev)``.
    :type out: array
    :param lse: the forward's log-sum-exp (``return_lse=True``), ``(..., Hq, L)``, at least as
        precise as the query.
    :type lse: array
    :param attn_mask: boolean (True = may attend) or floating (added to the scores), broadcastable
        to ``(..., Hq, L, S)``; or a causal mask object (``engine.causal_lower_right``, torch's
        ``CausalBias``).
    :type attn_mask: array | CausalBias | None
    :param is_causal: top-left causal mask (``tril(ones(L, S))``); not together with ``attn_mask``.
    :type is_causal: bool
    :param scale: score scale; None is ``1/sqrt(E)``.
    :type scale: float | None
    :param enable_gqa: grouped-query attention: H divides Hq, key/value head j serves query heads
        ``j*Hq/H ... (j+1)*Hq/H - 1``.
    :type enable_gqa: bool
    :param backend: ``"auto"`` or a name from ``engine.list_backends()`` whose capabilities include
        the backward.
    :type backend: str
    :param score_mod: the forward's; its derivative with respect to the score is the one it
        declares (``engine.problems.mods.with_score_grad``) or else found by complex-step
        differentiation, checked against finite differences. ``mask_mod`` needs none.
    :type score_mod: Callable | None
    :param mask_mod: the forward's.
    :type mask_mod: Callable | None
    :param block_mask: the forward's.
    :type block_mask: BlockMask | None
    :param mod_args: the forward's; float arrays among them get gradients with
        ``return_mod_args_grad``.
    :type mod_args: tuple
    :param dropout_p: the forward's; with ``dropout_p > 0``, ``dropout_seed`` must be the seed the
        forward used (the dropped weights are regenerated from it, never stored).
    :type dropout_p: float
    :param dropout_seed: the seed the forward used (required with ``dropout_p > 0``).
    :type dropout_seed: int | None
    :param return_mask_grad: also return the gradient of the floating ``attn_mask``, in its
        shape and dtype (summed over the dimensions it broadcasts along), e.g. to train a
        learned bias.
    :type return_mask_grad: bool
    :param grad_lse: the gradient of the loss with respect to ``lse`` when the loss uses it too
        (shape ``(..., Hq, L)``, a float dtype at least as precise as the query's); None for zero.
        Since d lse_i / d s_ij is the weight P_ij, it adds ``grad_lse_i * P_ij`` to each score's
        gradient (rows with no visible key: nothing).
    :type grad_lse: array | None
    :param return_mod_args_grad: also return the gradients of float arrays among ``mod_args``
        that the ``score_mod`` reads (a learned bias table, slopes...): ``True`` for every float
        array with at least one dimension, or one bool per ``mod_args`` entry. Each element read
        is found by a recorded gather and differentiated by complex step; the mod must be analytic
        in what it reads (``docs/training.md`` lists the limits). Integer arrays and numbers take
        none (marking one is a ``ValueError``).
    :type return_mod_args_grad: bool | tuple[bool, ...]
    :param sinks: the forward's sinks ``(Hq,)``; ``out`` and ``lse`` must be the forward's with
        them. The backends' kernels need no change: FlashAttention-2's backward given the
        forward's ``lse`` (which holds the sink) recomputes the weights with the sink.
    :type sinks: array | None
    :param return_sinks_grad: also return the sinks' gradient ``(Hq,)`` in their dtype,
        ``-sum_i exp(sink_h - lse_i) * rowsum(grad_out * out)_i`` over the rows of head h
        (``engine.problems.sinks``); it comes after the mask's gradient.
    :type return_sinks_grad: bool
    :return: ``(dq, dk, dv)`` in the shapes and dtype of query, key and value, then, each only
        when asked for and in this order: the mask's gradient (``return_mask_grad=True``), the
        sinks' gradient (``return_sinks_grad=True``), and the ``mod_args`` gradients as one tuple
        in the order of ``mod_args`` (each in the shape and dtype of its array, None for entries
        that take none). With GQA, ``dk``/``dv`` sum their query heads; an input broadcast along
        batch or head axes (a key of batch 1 serving a query of batch 3, a 2-D key) gets its
        gradient summed over them, in its own shape, as torch's autograd gives it.
        The ``cpu`` backend's gradients are the same bit for bit on every run with the same
        thread count (``engine.set_num_threads``); the ``cuda`` backend's on every run (no atomics).
    :raises TypeError: an argument of the wrong kind, naming it, before any kernel runs (the
        forward's checks and messages, then ``grad_out``/``out``/``lse`` dtypes).
    :raises ValueError: bad shapes or values (``grad_out``/``out``/``lse`` shapes), a score_mod
        with no usable derivative, or ``mod_args`` marked that cannot take a gradient, before any
        kernel runs. A score_mod that cannot be differentiated with respect to its marked
        ``mod_args`` is a ``TypeError`` naming it.
    :raises engine.NotSupportedError: the backend has no backward or cannot run the inputs (e.g.
        ``cuda`` with float64 or E = 0, ``cpu`` with 16-bit inputs).
    """
    problem = validate_backward_args(
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        score_mod,
        mask_mod,
        block_mask,
        mod_args,
        dropout_p,
        dropout_seed,
        return_mask_grad,
        grad_lse,
        return_mod_args_grad,
        sinks=sinks,
    )
    want_dsinks = check_bool(return_sinks_grad, "return_sinks_grad")
    if want_dsinks and problem.sinks is None:
        raise ValueError("return_sinks_grad=True needs sinks= (the forward's attention sinks)")
    grads = run_backward(problem, select_backend(backend, problem))
    result = (grads.dq, grads.dk, grads.dv)
    if problem.return_mask_grad:
        result += (grads.dmask,)
    if want_dsinks:
        result += (backward_sinks_grad(problem),)
    if not (isinstance(return_mod_args_grad, (bool, np.bool_)) and not return_mod_args_grad):  # asked for
        result += (grads.dmod_args if grads.dmod_args is not None else (None,) * len(problem.mod_args),)
    return result


def backward_sinks_grad(problem: BackwardProblem):
    """The sinks' gradient ``(Hq,)`` of a validated backward problem with sinks (host arrays)."""
    return sinks_grad(
        problem.grad_out,
        problem.out,
        problem.lse,
        problem.sinks,
        -2 if problem.lead_shape else None,
        problem.grad_lse,
    )


def run_backward(problem: BackwardProblem, chosen) -> Gradients:
    """The :class:`~engine.problems.backward.Gradients` of a validated backward problem on the
    chosen backend (an op returning a plain ``(dq, dk, dv, dmask)`` tuple is accepted), each
    gradient in the shape of its input."""
    if problem.is_empty and not problem.on_device:
        grads = empty_gradients(problem)
    else:
        grads = chosen.op(BackwardProblem).run(problem)
    if not isinstance(grads, Gradients):
        grads = Gradients(*grads)
    dq, dk, dv = _summed_to_input_shapes(problem, (grads.dq, grads.dk, grads.dv))
    grads = grads._replace(dq=dq, dk=dk, dv=dv)
    if problem.mod_args_grad and grads.dmod_args is None:  # no score_mod, or an empty problem: zeros
        grads = grads._replace(dmod_args=zero_mod_args_grads(problem))
    return grads


def _summed_to_input_shapes(problem: BackwardProblem, grads: tuple) -> tuple:
    """Backends compute the gradients of the broadcast views (``problem.query.shape``...); an input
    broadcast along batch or head axes gets the sum over them, in its own shape (as torch's
    autograd sums), deterministically. Device inputs are never broadcast views (the ``cuda``
    backward refuses broadcast device inputs), so they need nothing."""
    if problem.on_device or not problem.input_shapes:
        return tuple(grads)
    return tuple(
        g if tuple(g.shape) == shape else reduce_to_shape(g, shape).astype(problem.dtype)
        for g, shape in zip(grads, problem.input_shapes)
    )


def zero_mod_args_grads(problem: BackwardProblem) -> tuple:
    """The ``mod_args`` gradients when nothing depends on them: zeros for the marked arrays."""
    return tuple(
        np.zeros(a.shape, dtype=a.dtype) if m else None for a, m in zip(problem.mod_args, problem.mod_args_grad)
    )
