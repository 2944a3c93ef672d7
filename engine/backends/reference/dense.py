"""Attention with the score matrix materialised, in float64: the oracle's arithmetic.

Shared by the ``reference`` backend (the test oracle, forward and backward), the variants'
``need_weights=True`` and the cpu backend's exact path for non-finite values. Memory is O(L x S)
per head.
"""

from __future__ import annotations

import numpy as np

from ...kernels.philox import keep_mask_numpy
from ...problems.attention import AttentionProblem
from ...problems.masks import reduce_to_shape
from ...problems.mods import python_function

__all__ = [
    "scores",
    "softmax",
    "attention_probabilities",
    "add_nonfinite_values",
    "dropout_multipliers",
    "gradients",
    "apply_mods_dense",
    "score_grad_dense",
    "sink_column",
]


def scores(problem: AttentionProblem, cols=None, score_grad=None) -> np.ndarray:
    """Scaled, masked scores in float64, shape (batch..., Hq, L, S); masked entries are -inf.

    ``cols`` (optional key indices) restricts the result to those key columns, with causal
    masking, masks and mods still applied at their absolute positions. ``score_grad``: a list
    that receives d score_mod / d score at every element (None without a score_mod).
    """
    q = np.asarray(problem.query, dtype=np.float64)
    k = np.asarray(problem.key, dtype=np.float64)
    kv_idx = np.arange(problem.S) if cols is None else np.asarray(cols)
    if cols is not None:
        k = k[..., kv_idx, :]
    if problem.group > 1:  # torch's repeat_interleave on the head axis
        k = np.repeat(k, problem.group, axis=-3)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * problem.scale
    flat = (problem.batch, problem.num_q_heads, problem.L, len(kv_idx))
    if score_grad is not None:
        score_grad.append(
            None
            if problem.score_mod is None
            else score_grad_dense(
                s.reshape(flat), problem.score_mod, problem.score_grad, problem.mod_args, kv_idx
            ).reshape(s.shape)
        )
    if problem.score_mod is not None:
        s = apply_mods_dense(s.reshape(flat), problem.score_mod, None, problem.mod_args, kv_idx).reshape(s.shape)
    if problem.is_causal:
        rows = np.arange(problem.L)[:, None] + problem.causal_offset
        s = np.where(kv_idx[None, :] <= rows, s, -np.inf)
    if problem.mask_kind is not None:
        m = problem.attn_mask
        if cols is not None:
            m = np.take(m, kv_idx if m.shape[-1] > 1 else np.zeros_like(kv_idx), axis=-1)
        if problem.mask_kind == "bool":
            s = np.where(m, s, -np.inf)
        else:
            m = np.asarray(m, dtype=np.float64)
            s = np.where(np.isneginf(m), -np.inf, s + m)  # -inf hides the key, even a NaN score
    if problem.mask_mod is not None:
        s = apply_mods_dense(s.reshape(flat), None, problem.mask_mod, problem.mod_args, kv_idx).reshape(s.shape)
    return s


def add_nonfinite_values(problem: AttentionProblem, out: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Complete a result computed with the non-finite entries of ``value`` replaced by 0.

    Every row whose weight for such a key is > 0 gets the NaN/inf added (so it becomes NaN or
    inf); rows that do not attend to the key stay untouched, and so do rows that see no key at all
    (lse = -inf: their weights are exp(-inf - (-inf)) = NaN here, not weights). Weights are
    recomputed for the few affected key columns only, as exp(score - lse), from the same scoring
    as the oracle.
    """
    v = np.asarray(problem.value)
    finite = np.isfinite(v)
    cols = np.nonzero((~finite.all(axis=-1)).reshape(-1, problem.S).any(axis=0))[0]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(scores(problem, cols) - np.asarray(lse, dtype=np.float64)[..., None])
    bad = np.where(finite, 0.0, v)[..., cols, :]
    if problem.group > 1:
        bad = np.repeat(bad, problem.group, axis=-3)
    sees_a_key = ~np.isneginf(np.asarray(lse))[..., None]  # a row that sees nothing stays zeros
    attends = sees_a_key & ((p > 0) | np.isnan(p))  # (..., Hq, L, cols)
    contrib = np.where(attends[..., None], bad[..., None, :, :], 0.0).sum(axis=-2)
    return (out + contrib).astype(out.dtype)


def softmax(s: np.ndarray, sink=None):
    """Row softmax and log-sum-exp; rows with no finite score give zeros and -inf.

    ``sink`` (float64, broadcastable to ``s.shape[:-1] + (1,)``): a logit that joins every row's
    softmax without a column of its own (attention sinks, ``engine.problems.sinks``): the weights
    of the scores then sum to less than 1, and a row with no visible key has lse = sink."""
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)  # S = 0: no key, -inf
    if sink is not None:
        m = np.maximum(m, sink)
    dead = np.isneginf(m)
    m = np.where(dead, 0.0, m)
    with np.errstate(invalid="ignore"):  # NaN scores propagate as NaN, as they should
        e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    if sink is not None:
        total = total + np.exp(sink - m)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(dead, 0.0, e / np.where(dead, 1.0, total))
        lse = np.where(dead, -np.inf, m + np.log(np.where(dead, 1.0, total)))[..., 0]
    return p, lse


def attention_probabilities(problem: AttentionProblem) -> np.ndarray:
    """The attention weights softmax(scores), shape (batch..., Hq, L, S), in the problem's dtype.

    This materialises L x S per head: it is what ``need_weights=True`` returns.
    """
    p, _ = softmax(scores(problem))
    return p.astype(problem.dtype, copy=False)


def dropout_multipliers(problem: AttentionProblem):
    """The dropout stream's (batch..., Hq, L, S) multipliers, 1 / (1 - p) where kept and 0 where
    dropped, or None without dropout."""
    if problem.dropout_p == 0:
        return None
    keep = keep_mask_numpy(
        problem.dropout_seed, problem.dropout_p, problem.batch, problem.num_q_heads, problem.L, problem.S
    )
    scale = 0.0 if problem.dropout_p == 1 else 1.0 / (1.0 - problem.dropout_p)
    return (keep * scale).reshape(problem.lse_shape + (problem.S,))


def gradients(problem: AttentionProblem):
    """``(dq, dk, dv, dmask, dmod_args)`` of a backward problem, in float64, from scratch: the oracle.

    The exact gradient of the attention function at the inputs (the softmax is recomputed here,
    ``out`` and ``lse`` are not used): with P the weights, Z the dropout multipliers and g the
    score_mod's derivative, ``dV = (P Z)^T dO``, ``dP = (dO V^T) Z``, ``dS = P (dP - rowsum(P dP))``,
    ``dQ = scale (dS g) K``, ``dK = scale (dS g)^T Q`` (summed over a GQA group), and the float
    mask's gradient is ``dS`` summed over the dimensions it broadcasts along. A gradient through
    lse adds ``P grad_lse`` to dS. Rows with no visible key have P = 0, so zero gradients. With
    sinks, P is the softmax with the sink's column (``engine.problems.sinks``), so every formula
    above holds as written.
    """
    grads = []
    s = scores(problem, score_grad=grads)
    g = grads[0]
    p, _ = softmax(s, sink_column(problem))
    do = np.asarray(problem.grad_out, dtype=np.float64)
    q = np.asarray(problem.query, dtype=np.float64)
    k = np.asarray(problem.key, dtype=np.float64)
    v = np.asarray(problem.value, dtype=np.float64)
    group = problem.group
    if group > 1:
        k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    z = dropout_multipliers(problem)
    pz = p if z is None else p * z
    dv = np.matmul(np.swapaxes(pz, -1, -2), do)
    dp = np.matmul(do, np.swapaxes(v, -1, -2))
    if z is not None:
        dp = dp * z
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    if problem.grad_lse is not None:  # d lse_i / d s_ij = P_ij
        ds = ds + p * np.asarray(problem.grad_lse, dtype=np.float64)[..., None]
    dmod_args = mod_args_gradients(problem, ds) if problem.mod_args_grad and problem.score_mod is not None else None
    dmask = None
    if problem.return_mask_grad:
        dmask = reduce_to_shape(ds, problem.attn_mask.shape).astype(problem.attn_mask.dtype)
    if g is not None:
        with np.errstate(invalid="ignore"):
            ds = np.where(p > 0, ds * g, 0.0)  # masked elements: weight 0, whatever g is there
    dq = problem.scale * np.matmul(ds, k)
    dk = problem.scale * np.matmul(np.swapaxes(ds, -1, -2), q)
    if group > 1:  # key/value head j served query heads j*group ... (j+1)*group - 1
        dk = dk.reshape(dk.shape[:-3] + (problem.num_kv_heads, group) + dk.shape[-2:]).sum(axis=-3)
        dv = dv.reshape(dv.shape[:-3] + (problem.num_kv_heads, group) + dv.shape[-2:]).sum(axis=-3)
    return dq, dk, dv, dmask, dmod_args


def mod_args_gradients(problem: AttentionProblem, ds: np.ndarray) -> tuple:
    """The marked ``mod_args``' gradients: for every score with ``ds`` (d loss / d the mod's
    output) nonzero, ``ds`` times the mod's complex-step partials with respect to the elements it
    reads (``engine.kernels.mod_arg_grad.arg_grad_python``), summed in float64 in C order."""
    from ...kernels.mod_arg_grad import arg_grad_python
    from ...problems.mod_args_grad import mod_args_offsets

    marks = problem.mod_args_grad
    offsets = mod_args_offsets(marks, problem.mod_args)
    step = arg_grad_python(problem.score_mod, marks, offsets)
    q = np.asarray(problem.query, dtype=np.float64)
    k = np.asarray(problem.key, dtype=np.float64)
    if problem.group > 1:
        k = np.repeat(k, problem.group, axis=-3)
    flat = (problem.batch, problem.num_q_heads, problem.L, problem.S)
    raw = (np.matmul(q, np.swapaxes(k, -1, -2)) * problem.scale).reshape(flat)
    ds = ds.reshape(flat)
    acc = np.zeros(int(offsets[-1]))
    for b, h, i, j in zip(*np.nonzero(ds)):
        step(float(ds[b, h, i, j]), float(raw[b, h, i, j]), int(b), int(h), int(i), int(j), problem.mod_args, acc)
    return tuple(
        acc[offsets[i] : offsets[i] + a.size].reshape(a.shape).astype(a.dtype) if m else None
        for i, (a, m) in enumerate(zip(problem.mod_args, marks))
    )


def sink_column(problem):
    """The problem's sinks as a float64 column that broadcasts against its (..., Hq, L, S) scores
    (one per query head), or None without sinks."""
    if problem.sinks is None:
        return None
    sinks = np.asarray(problem.sinks, dtype=np.float64)
    return sinks.reshape(()) if not problem.lead_shape else sinks.reshape((-1, 1, 1))


def apply_mods_dense(scores: np.ndarray, score_mod, mask_mod, mod_args: tuple, kv_idx=None) -> np.ndarray:
    """The oracle: apply the mods elementwise to a materialised (B, H, L, S) float64 score array
    whose last axis holds the keys ``kv_idx`` (default: all of them, 0 ... S-1)."""
    B, H, L, S = scores.shape
    kv_idx = np.arange(S) if kv_idx is None else np.asarray(kv_idx)
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(H), np.arange(L), kv_idx, indexing="ij", sparse=True)
    n = len(mod_args)
    if score_mod is not None:
        f = np.vectorize(python_function(score_mod), otypes=[np.float64], excluded=set(range(5, 5 + n)))
        scores = f(scores, b, h, i, j, *mod_args) if scores.size else scores
    if mask_mod is not None:
        g = np.vectorize(python_function(mask_mod), otypes=[bool], excluded=set(range(4, 4 + n)))
        allowed = g(b, h, i, j, *mod_args) if scores.size else np.zeros(scores.shape, bool)
        scores = np.where(np.broadcast_to(allowed, scores.shape), scores, -np.inf)
    return scores


def score_grad_dense(scores: np.ndarray, score_mod, score_grad, mod_args: tuple, kv_idx=None) -> np.ndarray:
    """The oracle's d score_mod / d score over a (B, H, L, S) float64 array of raw scaled scores,
    from Python functions: the mod's declared ``score_grad``, else complex-step on the mod's
    Python function (``score_grad`` is the compiled derivative, used only to find a declared one)."""
    from ...kernels.score_grad import complex_step_grad_python

    B, H, L, S = scores.shape
    kv_idx = np.arange(S) if kv_idx is None else np.asarray(kv_idx)
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(H), np.arange(L), kv_idx, indexing="ij", sparse=True)
    declared = getattr(python_function(score_mod), "score_grad", None) or getattr(score_mod, "score_grad", None)
    fn = python_function(declared) if declared is not None else complex_step_grad_python(score_mod)
    n = len(mod_args)
    f = np.vectorize(fn, otypes=[np.float64], excluded=set(range(5, 5 + n)))
    return f(scores, b, h, i, j, *mod_args) if scores.size else np.zeros(scores.shape)
