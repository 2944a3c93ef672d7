"""The ``reference`` backend's varlen ops: each packed sequence is one materialised float64
attention (``sequences.sequence_problem``: its bottom-right causal/window rows as a boolean mask,
the mods at its positions), forward and backward: the varlen oracle is the dense oracle."""

from __future__ import annotations

import numpy as np

from ...problems.attention import BackwardProblem
from ...problems.varlen import VarlenBackwardProblem, VarlenProblem
from ..base import Op
from .dense import gradients
from .forward import DTYPES, attend
from .sequences import sequence_problem

__all__ = ["ReferenceVarlen", "ReferenceVarlenBackward"]


def _sequences(problem: VarlenProblem):
    """``(b, rows, keys, q, k, v)`` for every sequence with at least one query row and one key:
    its slices of the packed arrays and its head-major views (Hq, L_b, E), (H, S_b, E/Ev)."""
    cq, ck = problem.cu_seqlens_q, problem.cu_seqlens_k
    for b in range(problem.batch):
        rows, keys = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        if rows.start == rows.stop or keys.start == keys.stop:
            continue
        q, k, v = (
            np.swapaxes(a[s], 0, 1) for a, s in ((problem.query, rows), (problem.key, keys), (problem.value, keys))
        )
        yield b, rows, keys, q, k, v


class ReferenceVarlen(Op):
    problem_type = VarlenProblem
    dtypes = DTYPES
    supports_mods = True

    def run(self, problem: VarlenProblem):
        out = np.zeros(problem.out_shape, dtype=problem.dtype)
        lse = np.full(problem.lse_shape, -np.inf, dtype=problem.dtype)
        for b, rows, _, q, k, v in _sequences(problem):
            o, lse_b = attend(sequence_problem(problem, b, q, k, v))
            out[rows], lse[rows] = np.swapaxes(o, 0, 1), lse_b.T
        return out, lse


class ReferenceVarlenBackward(Op):
    problem_type = VarlenBackwardProblem
    dtypes = DTYPES
    supports_mods = True
    #: the dense softmax takes the sink's column (dense.sink_column)
    supports_sinks = True
    #: the dense backward adds P * grad_lse to dS
    supports_lse_grad = True

    def run(self, problem: VarlenBackwardProblem):
        grads = [np.zeros(a.shape, dtype=np.float64) for a in (problem.query, problem.key, problem.value)]
        for b, rows, keys, q, k, v in _sequences(problem):
            sub = sequence_problem(
                problem,
                b,
                q,
                k,
                v,
                cls=BackwardProblem,
                grad_out=np.swapaxes(problem.grad_out[rows], 0, 1),
                out=np.swapaxes(problem.out[rows], 0, 1),
                lse=np.asarray(problem.lse[rows]).T,
                score_grad=problem.score_grad,
                sinks=problem.sinks,
                grad_lse=None if problem.grad_lse is None else np.asarray(problem.grad_lse[rows]).T,
            )
            dq, dk, dv = gradients(sub)[:3]
            for g, s, d in zip(grads, (rows, keys, keys), (dq, dk, dv)):
                g[s] = np.swapaxes(d, 0, 1)
        return tuple(g.astype(problem.dtype) for g in grads)
