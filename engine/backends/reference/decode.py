"""The ``reference`` backend's decode op: write the new entries, then each sequence is one
materialised attention over the keys it sees (gathered through its pages), with its causal/window
rows as a boolean mask and the mods shifted to absolute positions: the decoding oracle is the
forward oracle."""

from __future__ import annotations

import numpy as np

from ...problems.attention import AttentionProblem
from ...problems.decode import DecodeProblem
from ...problems.mods import python_function
from ..base import Op
from ..kvcache import gather_sequence, new_entries_written
from .forward import DTYPES, attend

__all__ = ["ReferenceDecode"]


class ReferenceDecode(Op):
    problem_type = DecodeProblem
    dtypes = DTYPES
    cache_dtypes = DTYPES
    supports_mods = True

    def run(self, problem: DecodeProblem):
        with new_entries_written(problem):  # undone if the attention below raises
            return _decode(problem)


def _decode(problem: DecodeProblem):
    out = np.zeros(problem.out_shape, dtype=problem.dtype)
    lse = np.full(problem.lse_shape, -np.inf, dtype=problem.dtype)
    for b in range(problem.batch):
        S = int(problem.seqlens_k[b])
        if S == 0:
            continue
        k, v = gather_sequence(problem, b)
        first = S - problem.L  # position of query row 0
        pos = first + np.arange(problem.L)[:, None]
        j = np.arange(S)[None, :]
        visible = np.ones((problem.L, S), dtype=bool)
        left, right = problem.window
        if problem.is_causal:
            visible &= j <= pos
        if left >= 0:
            visible &= j >= pos - left
        if right >= 0:
            visible &= j <= pos + right
        sub = AttentionProblem(
            query=problem.query[b],
            key=k,
            value=v,
            attn_mask=visible,
            mask_kind="bool",
            batch_shape=(),
            lead_shape=(problem.num_q_heads,),
            num_q_heads=problem.num_q_heads,
            num_kv_heads=problem.num_kv_heads,
            L=problem.L,
            S=S,
            E=problem.E,
            Ev=problem.Ev,
            dtype=problem.dtype,
            is_causal=False,
            scale=problem.scale,
            return_lse=True,
            on_device=False,
            mod_args=problem.mod_args,
            score_mod=_at_positions(problem.score_mod, b, first, True),
            mask_mod=_at_positions(problem.mask_mod, b, first, False),
        )
        out[b], lse[b] = attend(sub)
    return out, lse


def _at_positions(mod, b: int, first: int, is_score: bool):
    """A mod of one sequence's sub-problem (batch index 0, rows from 0) calling the caller's mod with
    the sequence's batch index and absolute query positions."""
    if mod is None:
        return None
    fn = python_function(mod)
    if is_score:
        return lambda score, _b, h, i, j, *args: fn(score, b, h, i + first, j, *args)
    return lambda _b, h, i, j, *args: fn(b, h, i + first, j, *args)
