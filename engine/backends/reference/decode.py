"""The ``reference`` backend's decode op: write the new entries, then each sequence is one
materialised attention over the keys it sees (gathered through its pages), with its causal/window
rows as a boolean mask and the mods shifted to absolute positions (``sequences``): the decoding
oracle is the forward oracle. Packed queries (``cu_seqlens_q``) are the same, sequence by sequence."""

from __future__ import annotations

import numpy as np

from ...problems.decode import DecodeProblem
from ..base import Op
from ..kvcache import gather_sequence, new_entries_written
from .forward import DTYPES, attend
from .sequences import sequence_problem

__all__ = ["ReferenceDecode"]


class ReferenceDecode(Op):
    problem_type = DecodeProblem
    dtypes = DTYPES
    cache_dtypes = DTYPES
    supports_mods = True
    supports_cu_seqlens_q = True

    def run(self, problem: DecodeProblem):
        with new_entries_written(problem):  # undone if the attention below raises
            return _decode(problem)


def _decode(problem: DecodeProblem):
    out = np.zeros(problem.out_shape, dtype=problem.dtype)
    lse = np.full(problem.lse_shape, -np.inf, dtype=problem.dtype)
    q_lens, seqlens_k = problem.q_lens, problem.seqlens_k
    for b in range(problem.batch):
        S, L = int(seqlens_k[b]), int(q_lens[b])
        if S == 0 or L == 0:
            continue
        k, v = gather_sequence(problem, b)
        if problem.packed:  # rows r0 ... r0 + L - 1 of the packed (total, Hq, D) query
            r0 = int(problem.cu_seqlens_q[b])
            o, lse_b = attend(sequence_problem(problem, b, np.swapaxes(problem.query[r0 : r0 + L], 0, 1), k, v))
            out[r0 : r0 + L], lse[r0 : r0 + L] = np.swapaxes(o, 0, 1), lse_b.T
        else:
            out[b], lse[b] = attend(sequence_problem(problem, b, problem.query[b], k, v))
    return out, lse
