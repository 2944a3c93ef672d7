"""``varlen_attention``: attention over sequences of different lengths packed into one array
(FlashAttention's ``flash_attn_varlen_func``), and its gradients.

Validate (``engine.problems.varlen``) -> pick a backend -> its varlen op; the sinks are applied
around the op (``engine.problems.sinks``), so every backend gets them.
"""

from __future__ import annotations

import numpy as np

from .backends.base import empty_result
from .dispatch import select_backend
from .problems.base import check_bool
from .problems.sinks import run_with_sinks, sinks_grad
from .problems.varlen import VarlenBackwardProblem, validate_varlen_args, validate_varlen_backward_args

__all__ = ["varlen_attention", "varlen_attention_backward"]


def varlen_attention(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    is_causal=False,
    scale=None,
    window=None,
    sinks=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    return_lse=False,
    backend="auto",
):
    """Attention of B sequences of different lengths, packed without padding (FlashAttention's
    ``flash_attn_varlen_func``).

    The cost is proportional to ``sum_b len_q[b] * len_k[b]`` (times the heads), never to a padded
    batch: the ``cpu`` kernel's tasks are (sequence, key/value head, block of query rows).

    :param query: ``(total_q, Hq, E)``: the sequences' query rows one after the other, float32 or
        float64 (float16/bfloat16 computed in float32 on ``cpu``).
    :type query: array
    :param key: ``(total_k, H, E)``, the query's dtype. H divides Hq (grouped-query attention):
        query head h reads key/value head ``h // (Hq // H)``, as FlashAttention and torch's
        ``repeat_interleave``.
    :type key: array
    :param value: ``(total_k, H, Ev)``, the query's dtype.
    :type value: array
    :param cu_seqlens_q: int32 ``(B + 1,)`` host array of cumulative offsets: sequence b owns query
        rows ``cu_seqlens_q[b] ... cu_seqlens_q[b+1] - 1``. Starts at 0, never decreases (a
        sequence may be empty) and ends at ``total_q``.
    :type cu_seqlens_q: ndarray
    :param cu_seqlens_k: the same for the key rows, ending at ``total_k``.
    :type cu_seqlens_k: ndarray
    :param is_causal: query row i of sequence b is the token at position ``p = i + len_k[b] -
        len_q[b]`` (aligned at the **bottom right**, FlashAttention's varlen convention; ``p = i``
        when the lengths are equal); causal, it sees keys ``j <= p``. A row with no visible key
        gives zeros and ``lse = -inf``.
    :type is_causal: bool
    :param scale: defaults to ``1/sqrt(E)``.
    :type scale: float | None
    :param window: ``(left, right)``: only keys ``p - left <= j <= p + right`` (-1 or None:
        unbounded on that side), FlashAttention's ``window_size``.
    :type window: tuple[int | None, int | None] | None
    :param sinks: float ``(Hq,)`` attention sinks (gpt-oss): a logit per query head, in the units of
        the scaled scores, that joins each row's softmax and carries no value; ``lse`` includes it
        and a row with no visible key gives zeros and ``lse = sinks[h]`` (``engine.problems.sinks``).
    :type sinks: ndarray | None
    :param score_mod: ``score_mod(score, b, h, q_idx, kv_idx, *mod_args)`` as in
        ``scaled_dot_product_attention``, with ``b`` the sequence, ``h`` the query head, ``q_idx =
        p`` and ``kv_idx = j``: positions **within the sequence**, under the alignment that causal
        and window use.
    :type score_mod: Callable | None
    :param mask_mod: ``mask_mod(b, h, q_idx, kv_idx, *mod_args)``, likewise.
    :type mask_mod: Callable | None
    :param mod_args: the mods' extra arguments.
    :type mod_args: tuple
    :param return_lse: also return the natural-log log-sum-exp of the scaled, masked scores,
        ``(total_q, Hq)``: the output's shape without its last axis, as every lse of the engine, so
        that ``engine.merge_attention`` takes it (FlashAttention returns the transpose,
        ``(Hq, total_q)``).
    :type return_lse: bool
    :param backend: ``"auto"`` or a backend with a varlen op (``cpu``, ``reference``).
    :type backend: str
    :return: ``out`` ``(total_q, Hq, Ev)`` in the query's dtype, or ``(out, lse)``.
    :raises TypeError: a wrong kind of argument (a non-float array, offsets that are not
        integers, host and device arrays mixed), naming it.
    :raises ValueError: a wrong shape or value: arrays not 3-D, head counts that do not divide,
        offsets of different lengths, not starting at 0, decreasing, or not ending at the packed
        row count; named with the values. Raised before any kernel runs.
    :raises engine.NotSupportedError: the backend cannot run the call (``cuda`` has no varlen op).
    """
    problem = validate_varlen_args(
        query,
        key,
        value,
        cu_seqlens_q,
        cu_seqlens_k,
        is_causal,
        scale,
        window,
        sinks,
        score_mod,
        mask_mod,
        mod_args,
        return_lse,
    )
    chosen = select_backend(backend, problem)
    out, lse = run_with_sinks(problem, lambda p: _forward(p, chosen), -1)
    return (out, lse) if return_lse else out


def _forward(problem, chosen):
    if problem.is_empty and not problem.on_device:
        return empty_result(problem)
    return chosen.op(type(problem)).run(problem)


def varlen_attention_backward(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    is_causal=False,
    scale=None,
    window=None,
    sinks=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    grad_lse=None,
    return_sinks_grad=False,
    backend="auto",
):
    """Gradients of :func:`varlen_attention` with respect to query, key and value (and the sinks).

    Pass the forward's arguments unchanged, with ``out`` and ``lse`` from the forward
    (``return_lse=True``; with sinks, the forward's with them) and ``grad_out``, the gradient of the
    loss with respect to ``out`` (``(total_q, Hq, Ev)``, the query's dtype), as
    ``scaled_dot_product_attention_backward`` takes them. The ``cpu`` backend recomputes the
    weights tile by tile from ``lse`` (FlashAttention-2's backward, Dao 2023; its tasks are
    (sequence, key/value head, run of key tiles), so the cost follows ``sum_b len_q[b] *
    len_k[b]``); ``reference`` recomputes everything densely in float64, sequence by sequence.

    :param grad_out: the gradient of the loss with respect to ``out``, ``(total_q, Hq, Ev)``.
    :type grad_out: array
    :param query: the forward's, ``(total_q, Hq, E)``.
    :type query: array
    :param key: the forward's, ``(total_k, H, E)``.
    :type key: array
    :param value: the forward's, ``(total_k, H, Ev)``.
    :type value: array
    :param out: the forward's output, ``(total_q, Hq, Ev)``.
    :type out: array
    :param lse: the forward's log-sum-exp (``return_lse=True``), ``(total_q, Hq)``.
    :type lse: array
    :param cu_seqlens_q: the forward's.
    :type cu_seqlens_q: ndarray
    :param cu_seqlens_k: the forward's.
    :type cu_seqlens_k: ndarray
    :param is_causal: the forward's.
    :type is_causal: bool
    :param scale: the forward's.
    :type scale: float | None
    :param window: the forward's.
    :type window: tuple[int | None, int | None] | None
    :param sinks: the forward's; ``out`` and ``lse`` must be the forward's with them.
    :type sinks: ndarray | None
    :param score_mod: the forward's; its derivative is the one it declares
        (``engine.with_score_grad``) or found by complex-step differentiation, as in
        ``scaled_dot_product_attention_backward``. ``mod_args`` get no gradient.
    :type score_mod: Callable | None
    :param mask_mod: the forward's.
    :type mask_mod: Callable | None
    :param mod_args: the forward's.
    :type mod_args: tuple
    :param grad_lse: the gradient of the loss with respect to ``lse`` when the loss uses it too,
        ``(total_q, Hq)``, a float dtype at least as precise as the query's; None for zero. Since
        d lse_i / d s_ij is the weight P_ij, it adds ``grad_lse_i * P_ij`` to each score's gradient
        (and reaches the sinks: d lse_i / d sink_h is the sink's weight).
    :type grad_lse: ndarray | None
    :param return_sinks_grad: also return the sinks' gradient ``(Hq,)`` in their dtype, after dv.
    :type return_sinks_grad: bool
    :param backend: ``"auto"`` or a backend with a varlen backward op (``cpu``, ``reference``).
    :type backend: str
    :return: ``(dq, dk, dv)`` in the shapes and dtype of query, key and value (with GQA, ``dk``/
        ``dv`` sum their query heads), then ``dsinks`` when ``return_sinks_grad=True``. The ``cpu``
        backend's gradients are the same bit for bit on every run with the same thread count.
    :raises TypeError: a wrong kind of argument, as the forward, then ``grad_out``/``out``/``lse``/
        ``grad_lse`` dtypes.
    :raises ValueError: bad shapes or values, as the forward, then ``grad_out``/``out``/``lse``/
        ``grad_lse`` shapes, ``return_sinks_grad`` without sinks, a score_mod with no usable derivative.
    :raises engine.NotSupportedError: the backend has no varlen backward (``cuda``) or cannot run
        the inputs (``cpu`` with 16-bit inputs).
    """
    problem = validate_varlen_backward_args(
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        is_causal,
        scale,
        window,
        sinks,
        score_mod,
        mask_mod,
        mod_args,
        grad_lse,
    )
    want_dsinks = check_bool(return_sinks_grad, "return_sinks_grad")
    if want_dsinks and problem.sinks is None:
        raise ValueError("return_sinks_grad=True needs sinks= (the forward's attention sinks)")
    chosen = select_backend(backend, problem)
    if problem.is_empty and not problem.on_device:  # no score: nothing depends on the inputs
        grads = tuple(np.zeros(a.shape, dtype=problem.dtype) for a in (problem.query, problem.key, problem.value))
    else:
        grads = chosen.op(VarlenBackwardProblem).run(problem)
    if want_dsinks:
        grads += (sinks_grad(problem.grad_out, problem.out, problem.lse, problem.sinks, -1, problem.grad_lse),)
    return grads
