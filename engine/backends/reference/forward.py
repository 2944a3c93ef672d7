"""The ``reference`` backend's forward op: the score matrix materialised in float64, the oracle."""

from __future__ import annotations

import numpy as np

from ...problems.attention import AttentionProblem
from ..base import Op
from .dense import add_nonfinite_values, dropout_multipliers, scores, softmax

__all__ = ["ReferenceForward", "attend"]

#: bfloat16 is ml_dtypes' NumPy dtype: computed in float64 like the others, rounded once
DTYPES = ("float16", "float32", "float64", "bfloat16")


def attend(problem: AttentionProblem):
    """``(out, lse)`` of a host problem, in its dtype, from float64 scores and weights."""
    p, lse = softmax(scores(problem))
    z = dropout_multipliers(problem)
    if z is not None:  # lse stays that of the weights before dropout, as the cpu kernel's
        p = p * z
    v = np.asarray(problem.value, dtype=np.float64)
    if problem.group > 1:
        v = np.repeat(v, problem.group, axis=-3)
    finite = np.isfinite(v)
    out = np.matmul(p, v if finite.all() else np.where(finite, v, 0.0))
    if not finite.all():  # 0 * NaN must not leak a bad value into rows that ignore it
        out = add_nonfinite_values(problem, out, lse)
    sixteen = problem.lse_float32 and problem.dtype.itemsize == 2
    return out.astype(problem.dtype), lse.astype(np.float32 if sixteen else problem.dtype)


class ReferenceForward(Op):
    problem_type = AttentionProblem
    dtypes = DTYPES
    supports_mods = True
    supports_dropout = True
    supports_causal_offset = True

    def run(self, problem: AttentionProblem):
        return attend(problem)
