"""``scaled_dot_product_attention_backward``: the gradients of the attention function.

Layered as the forward: validation (``engine.problems.attention``), dispatch (``engine.dispatch``), the
backend's backward op and its kernel (``engine.kernels.cpu.flash_bwd`` for ``cpu``).
"""

from __future__ import annotations

from .backends.base import empty_gradients
from .dispatch import select_backend
from .problems.attention import BackwardProblem
from .problems.backward import validate_backward_args
from .problems.base import check_bool
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

    :param dropout_p: the forward's; with ``dropout_p > 0``, ``dropout_seed`` must be the seed the
        forward used (the dropped weights are regenerated from it, never stored).
    :param score_mod: the forward's; its derivative with respect to the score is the one it
        declares (``engine.problems.mods.with_score_grad``) or else found by complex-step
        differentiation, checked against finite differences. ``mask_mod`` needs none.
        ``mod_args`` get no gradient.
    :param return_mask_grad: also return the gradient of the floating ``attn_mask``, in its
        shape and dtype (summed over the dimensions it broadcasts along), e.g. to train a
        learned bias.
    :param sinks: the forward's sinks ``(Hq,)``; ``out`` and ``lse`` must be the forward's with
        them. The backends' kernels need no change: FlashAttention-2's backward given the
        forward's ``lse`` (which holds the sink) recomputes the weights with the sink.
    :param return_sinks_grad: also return the sinks' gradient ``(Hq,)`` in their dtype,
        ``-sum_i exp(sink_h - lse_i) * rowsum(grad_out * out)_i`` over the rows of head h
        (``engine.problems.sinks``); it comes after the mask's gradient.
    :return: ``(dq, dk, dv)`` in the shapes and dtype of query, key and value, plus the mask's
        gradient when ``return_mask_grad=True``, then the sinks' when ``return_sinks_grad=True``.
        With GQA, ``dk``/``dv`` sum their query heads.
        The ``cpu`` backend's gradients are the same bit for bit on every run with the same
        thread count (``engine.set_num_threads``); the ``cuda`` backend's on every run (no atomics).
    :raises TypeError: an argument of the wrong kind, naming it, before any kernel runs (the
        forward's checks and messages, then ``grad_out``/``out``/``lse`` dtypes).
    :raises ValueError: bad shapes or values (``grad_out``/``out``/``lse`` shapes), or a score_mod
        with no usable derivative, before any kernel runs.
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
        sinks=sinks,
    )
    want_dsinks = check_bool(return_sinks_grad, "return_sinks_grad")
    if want_dsinks and problem.sinks is None:
        raise ValueError("return_sinks_grad=True needs sinks= (the forward's attention sinks)")
    dq, dk, dv, dmask = run_backward(problem, select_backend(backend, problem))
    grads = (dq, dk, dv) + ((dmask,) if problem.return_mask_grad else ())
    return grads + ((backward_sinks_grad(problem),) if want_dsinks else ())


def backward_sinks_grad(problem: BackwardProblem):
    """The sinks' gradient ``(Hq,)`` of a validated backward problem with sinks (host arrays)."""
    return sinks_grad(problem.grad_out, problem.out, problem.lse, problem.sinks, -2 if problem.lead_shape else None)


def run_backward(problem: BackwardProblem, chosen):
    """``(dq, dk, dv, dmask)`` of a validated backward problem on the chosen backend."""
    if problem.is_empty and not problem.on_device:
        return empty_gradients(problem)
    return chosen.op(BackwardProblem).run(problem)
