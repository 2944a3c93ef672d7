"""The ``reference`` backend's backward op: the exact gradients from materialised float64 weights."""

from __future__ import annotations

from ...problems.attention import BackwardProblem
from ..base import Op
from .dense import gradients
from .forward import DTYPES

__all__ = ["ReferenceBackward"]


class ReferenceBackward(Op):
    problem_type = BackwardProblem
    dtypes = DTYPES
    supports_mods = True
    supports_dropout = True
    supports_causal_offset = True
    #: the dense softmax takes the sink's column (dense.sink_column)
    supports_sinks = True

    def run(self, problem: BackwardProblem):
        dq, dk, dv, dmask = gradients(problem)
        return dq.astype(problem.dtype), dk.astype(problem.dtype), dv.astype(problem.dtype), dmask
