"""The ``reference`` backend: plain NumPy, materialises the score matrix. The test oracle."""
from __future__ import annotations

import numpy as np

from ..validation import AttentionProblem
from .base import Backend

__all__ = ["ReferenceBackend", "attention_probabilities"]


def _scores(problem: AttentionProblem) -> np.ndarray:
    """Scaled, masked scores in float64, shape (batch..., Hq, L, S); masked entries are -inf."""
    q = np.asarray(problem.query, dtype=np.float64)
    k = np.asarray(problem.key, dtype=np.float64)
    if problem.group > 1:  # torch's repeat_interleave on the head axis
        k = np.repeat(k, problem.group, axis=-3)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * problem.scale
    if problem.is_causal:
        allowed = np.tril(np.ones((problem.L, problem.S), dtype=bool))
        s = np.where(allowed, s, -np.inf)
    if problem.mask_kind == "bool":
        s = np.where(problem.attn_mask, s, -np.inf)
    elif problem.mask_kind == "float":
        s = s + np.asarray(problem.attn_mask, dtype=np.float64)
    return s


def _softmax(s: np.ndarray):
    """Row softmax and log-sum-exp; rows with no finite score give zeros and -inf."""
    m = np.max(s, axis=-1, keepdims=True)
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
    p, _ = _softmax(_scores(problem))
    return p.astype(problem.dtype, copy=False)


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy, materialised float64 scores; the oracle the other backends are tested against"
    dtypes = ("float16", "float32", "float64")
    priority = 0

    def run(self, problem):
        p, lse = _softmax(_scores(problem))
        v = np.asarray(problem.value, dtype=np.float64)
        if problem.group > 1:
            v = np.repeat(v, problem.group, axis=-3)
        out = np.matmul(p, v)
        return out.astype(problem.dtype), lse.astype(problem.dtype)
