"""Attention with the score matrix materialised, in float64: the oracle's arithmetic.

Shared by the ``reference`` backend (the test oracle), the variants' ``need_weights=True`` and the
cpu backend's exact path for non-finite values. Memory is O(L x S) per head.
"""
from __future__ import annotations

import numpy as np

from .mods import apply_mods_dense
from .validation import AttentionProblem

__all__ = ["scores", "softmax", "attention_probabilities", "add_nonfinite_values"]


def scores(problem: AttentionProblem, cols=None) -> np.ndarray:
    """Scaled, masked scores in float64, shape (batch..., Hq, L, S); masked entries are -inf.

    ``cols`` (optional key indices) restricts the result to those key columns, with causal
    masking, masks and mods still applied at their absolute positions.
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
    if problem.score_mod is not None:
        s = apply_mods_dense(s.reshape(flat), problem.score_mod, None, problem.mod_args,
                             kv_idx).reshape(s.shape)
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
        s = apply_mods_dense(s.reshape(flat), None, problem.mask_mod, problem.mod_args,
                             kv_idx).reshape(s.shape)
    return s


def add_nonfinite_values(problem: AttentionProblem, out: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """Complete a result computed with the non-finite entries of ``value`` replaced by 0.

    Every row whose weight for such a key is > 0 gets the NaN/inf added (so it becomes NaN or
    inf); rows that do not attend to the key stay untouched. Weights are recomputed for the few
    affected key columns only, as exp(score - lse), from the same scoring as the oracle.
    """
    v = np.asarray(problem.value)
    finite = np.isfinite(v)
    cols = np.nonzero((~finite.all(axis=-1)).reshape(-1, problem.S).any(axis=0))[0]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(scores(problem, cols) - np.asarray(lse, dtype=np.float64)[..., None])
    bad = np.where(finite, 0.0, v)[..., cols, :]
    if problem.group > 1:
        bad = np.repeat(bad, problem.group, axis=-3)
    attends = (p > 0) | np.isnan(p)                                   # (..., Hq, L, cols)
    contrib = np.where(attends[..., None], bad[..., None, :, :], 0.0).sum(axis=-2)
    return (out + contrib).astype(out.dtype)


def softmax(s: np.ndarray):
    """Row softmax and log-sum-exp; rows with no finite score give zeros and -inf."""
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)  # S = 0: no key, -inf
    dead = np.isneginf(m)
    m = np.where(dead, 0.0, m)
    with np.errstate(invalid="ignore"):  # NaN scores propagate as NaN, as they should
        e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
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
