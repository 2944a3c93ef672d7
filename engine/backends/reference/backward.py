"""The ``reference`` backend's backward op: the exact gradients from materialised float64 weights."""

from __future__ import annotations

from ...problems.attention import BackwardProblem
from ...problems.backward import Gradients
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

    supports_lse_grad = True
    supports_mod_args_grad = True

    def run(self, problem: BackwardProblem) -> Gradients:
        dq, dk, dv, dmask, dmod_args = gradients(problem)
        return Gradients(
            dq=dq.astype(problem.dtype),
            dk=dk.astype(problem.dtype),
            dv=dv.astype(problem.dtype),
            dmask=dmask,
            dmod_args=dmod_args,
        )
