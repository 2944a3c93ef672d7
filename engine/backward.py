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

__all__ = ["scaled_dot_product_attention_backward", "run_backward"]


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
    :param return_mask_grad: also return the gradient of the floating ``attn_mask``, in its
        shape and dtype (summed over the dimensions it broadcasts along), e.g. to train a
        learned bias.
    :param grad_lse: the gradient of the loss with respect to ``lse`` when the loss uses it too
        (shape ``(..., Hq, L)``, a float dtype at least as precise as the query's); None for zero.
        Since d lse_i / d s_ij is the weight P_ij, it adds ``grad_lse_i * P_ij`` to each score's
        gradient (rows with no visible key: nothing).
    :param return_mod_args_grad: also return the gradients of float arrays among ``mod_args``
        that the ``score_mod`` reads (a learned bias table, slopes...): ``True`` for every float
        array with at least one dimension, or one bool per ``mod_args`` entry. Each element read
        is found by a recorded gather and differentiated by complex step; the mod must be analytic
        in what it reads (``docs/training.md`` lists the limits). Integer arrays and numbers take
        none (marking one is a ``ValueError``).
    :return: ``(dq, dk, dv)`` in the shapes and dtype of query, key and value, then, each only
        when asked for and in this order: the mask's gradient (``return_mask_grad=True``), the
        sinks' gradient (``return_sinks_grad=True``, once sinks exist), and the ``mod_args``
        gradients as one tuple in the order of ``mod_args`` (each in the shape and dtype of its
        array, None for entries that take none). With GQA, ``dk``/``dv`` sum their query heads.
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
    )
    grads = run_backward(problem, select_backend(backend, problem))
    result = (grads.dq, grads.dk, grads.dv)
    if problem.return_mask_grad:
        result += (grads.dmask,)
    if not (isinstance(return_mod_args_grad, (bool, np.bool_)) and not return_mod_args_grad):  # asked for
        result += (grads.dmod_args if grads.dmod_args is not None else (None,) * len(problem.mod_args),)
    return result


def run_backward(problem: BackwardProblem, chosen) -> Gradients:
    """The :class:`~engine.problems.backward.Gradients` of a validated backward problem on the
    chosen backend (an op returning a plain ``(dq, dk, dv, dmask)`` tuple is accepted)."""
    if problem.is_empty and not problem.on_device:
        grads = empty_gradients(problem)
    else:
        grads = chosen.op(BackwardProblem).run(problem)
    if not isinstance(grads, Gradients):
        grads = Gradients(*grads)
    if problem.mod_args_grad and grads.dmod_args is None:  # no score_mod, or an empty problem: zeros
        grads = grads._replace(dmod_args=zero_mod_args_grads(problem))
    return grads


def zero_mod_args_grads(problem: BackwardProblem) -> tuple:
    """The ``mod_args`` gradients when nothing depends on them: zeros for the marked arrays."""
    return tuple(
        np.zeros(a.shape, dtype=a.dtype) if m else None for a, m in zip(problem.mod_args, problem.mod_args_grad)
    )
