"""The ``reference`` backend: plain NumPy, materialises the score matrix. The test oracle."""
from __future__ import annotations

import numpy as np

from ..materialised import add_nonfinite_values, scores, softmax
from .base import Backend

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy, materialised float64 scores; the oracle the other backends are tested against"
    # bfloat16 is ml_dtypes' NumPy dtype: computed in float64 like the others, rounded once
    dtypes = ("float16", "float32", "float64", "bfloat16")
    supports_mods = True
    supports_causal_offset = True
    priority = 0

    def run(self, problem):
        p, lse = softmax(scores(problem))
        v = np.asarray(problem.value, dtype=np.float64)
        if problem.group > 1:
            v = np.repeat(v, problem.group, axis=-3)
        finite = np.isfinite(v)
        out = np.matmul(p, v if finite.all() else np.where(finite, v, 0.0))
        if not finite.all():  # 0 * NaN must not leak a bad value into rows that ignore it
            out = add_nonfinite_values(problem, out, lse)
        return out.astype(problem.dtype), lse.astype(problem.dtype)
