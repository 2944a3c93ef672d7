"""``scaled_dot_product_attention``: validate, pick a backend, run it."""

from __future__ import annotations

from .backends.base import empty_result
from .dispatch import select_backend
from .plan.forward import forward_key, remember, run_cached
from .problems.attention import AttentionProblem, validate_attention_args
from .problems.sinks import run_with_sinks

__all__ = ["scaled_dot_product_attention", "run_forward"]


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    backend="auto",
    return_lse=False,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
    dropout_p=0.0,
    dropout_seed=None,
    sinks=None,
):
    """Attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes ``(..., Hq, L, E)``, ``(..., H, S, E)``, ``(..., H, S, Ev)`` -> ``(..., Hq, L, Ev)``
    (2-D ``(L, E)`` inputs are one head without batch). ``attn_mask`` is boolean (True = may
    attend) or floating (added to the scores), broadcastable to ``(..., Hq, L, S)``.
    ``is_causal`` is top-left aligned and excludes ``attn_mask``. ``scale`` defaults to
    ``1/sqrt(E)``. ``enable_gqa`` lets H divide Hq. Rows with no visible key are zeros.

    :param query: ``(..., Hq, L, E)``: float16, bfloat16, float32 or float64 (the output's dtype).
    :type query: array
    :param key: ``(..., H, S, E)``, the query's dtype; its leading dims broadcast with the query's.
    :type key: array
    :param value: ``(..., H, S, Ev)``, the query's dtype.
    :type value: array
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
    :param backend: ``"auto"`` or a name from ``engine.list_backends()``.
    :type backend: str
    :param return_lse: also return the natural-log log-sum-exp of the scaled, masked scores,
        shape ``(..., Hq, L)``, ``-inf`` for rows with no visible key.
    :type return_lse: bool
    :param score_mod: ``score_mod(score, b, h, q_idx, kv_idx, *mod_args) -> score`` rewrites each
        scaled score before masking (``b`` is the flattened batch index, ``h`` the query head).
    :type score_mod: Callable | None
    :param mask_mod: ``mask_mod(b, h, q_idx, kv_idx, *mod_args) -> bool``, True = may attend;
        combined with ``attn_mask``/``is_causal``. Both mods are compiled with ``numba.njit``.
    :type mask_mod: Callable | None
    :param block_mask: from ``engine.create_block_mask``: a ``mask_mod`` with its tile map, reused
        across calls (empty tiles are skipped).
    :type block_mask: BlockMask | None
    :param mod_args: a tuple of extra arguments passed to both mods (arrays, numbers).
    :type mod_args: tuple
    :param dropout_p: probability of dropping each attention weight (torch's ``dropout_p``); the
        kept ones are scaled by ``1 / (1 - dropout_p)``. ``lse`` is that of the weights before
        dropout. Applied whenever it is > 0 (this function has no training mode).
    :type dropout_p: float
    :param dropout_seed: int in 0 ... 2**64 - 1 keying the counter-based dropout stream: the same
        seed drops the same weights on every backend, tile size and thread count. None with
        ``dropout_p > 0``: drawn from NumPy's global generator (``np.random.seed`` repeats it);
        pass one explicitly to compute the backward (see ``docs/training.md``).
    :type dropout_seed: int | None
    :param sinks: attention sinks (gpt-oss, StreamingLLM): float ``(Hq,)``, one logit per query head
        in the units of the scaled scores, that joins each row's softmax and carries no value:
        ``softmax([scores, sink_h])`` without its last column weighs the values. ``lse`` then
        includes the sink; a row with no visible key gives zeros and ``lse = sink_h``. Host
        arrays only (device inputs with sinks are refused). The formula and its derivation:
        ``engine.problems.sinks``; see ``docs/serving.md``.
    :type sinks: array | None
    :return: ``out`` in the input dtype, or ``(out, lse)``.
    :raises TypeError: an argument of the wrong kind, naming it, before any kernel runs.
    :raises ValueError: a wrong shape or value, naming the argument and the shapes.
    :raises engine.NotSupportedError: the backend (or, with ``auto``, every backend) refuses the inputs.
    """
    # sinks take the full path every call (the plan's runner has no sink step)
    plan_key = (
        None
        if sinks is not None
        else forward_key(
            query,
            key,
            value,
            attn_mask,
            is_causal,
            enable_gqa,
            backend,
            return_lse,
            score_mod,
            mask_mod,
            block_mask,
            mod_args,
        )
    )
    if plan_key is not None:  # a call with this signature has run before: the checks values need
        result = run_cached(
            plan_key, query, key, value, attn_mask, scale, mod_args, block_mask, dropout_p, dropout_seed
        )
        if result is not None:
            return result if return_lse else result[0]
    problem = validate_attention_args(
        query,
        key,
        value,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        return_lse,
        score_mod,
        mask_mod,
        block_mask,
        mod_args,
        dropout_p,
        dropout_seed,
        sinks=sinks,
    )
    chosen = select_backend(backend, problem)
    out, lse = run_forward(problem, chosen)
    remember(plan_key, problem, chosen, chosen.op(type(problem)), query, key, value, attn_mask)
    return (out, lse) if return_lse else out


def run_forward(problem: AttentionProblem, chosen):
    """``(out, lse)`` of a validated problem on the chosen backend (empty problems need none), its
    sinks applied (``engine.problems.sinks``)."""
    return run_with_sinks(problem, lambda p: _run(p, chosen), -2 if problem.lead_shape else None)


def _run(problem: AttentionProblem, chosen):
    if problem.is_empty and not problem.on_device:
        return empty_result(problem)
    return chosen.op(type(problem)).run(problem)
