"""One sequence of a ragged batch (a KV cache's, a packed ``varlen_attention`` batch's) as a dense
attention problem for the oracle: its keys, its bottom-right causal/window rows as a boolean mask,
and the caller's mods called with the sequence's index and positions."""

from __future__ import annotations

import numpy as np

from ...problems.attention import AttentionProblem
from ...problems.mods import python_function

__all__ = ["bottom_right_visible", "sequence_problem", "at_positions"]


def bottom_right_visible(L: int, S: int, is_causal: bool, window: tuple) -> np.ndarray:
    """(L, S) bool: query row i, the token at position ``S - L + i``, sees key j when
    ``j <= S - L + i`` (causal) and ``S - L + i - left <= j <= S - L + i + right`` (window; -1 =
    unbounded): FlashAttention's alignment."""
    pos = S - L + np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    visible = np.ones((L, S), dtype=bool)
    left, right = window
    if is_causal:
        visible &= j <= pos
    if left >= 0:
        visible &= j >= pos - left
    if right >= 0:
        visible &= j <= pos + right
    return visible


def sequence_problem(problem, b: int, q, k, v, cls=AttentionProblem, **fields):
    """A dense problem for sequence ``b`` of ``problem`` (a decode or varlen problem): ``q``
    ``(Hq, L, E)``, ``k``/``v`` ``(Hkv, S, E/Ev)``, the rows' visible keys as a boolean mask, the
    mods at the sequence's positions; ``fields`` are the rest of ``cls``'s fields (a backward
    problem's, its sinks). A forward's sinks are applied by the public functions, not here."""
    L, S = q.shape[1], k.shape[1]
    first = S - L  # position of query row 0
    return cls(
        query=q,
        key=k,
        value=v,
        attn_mask=bottom_right_visible(L, S, problem.is_causal, problem.window),
        mask_kind="bool",
        batch_shape=(),
        lead_shape=(problem.num_q_heads,),
        num_q_heads=problem.num_q_heads,
        num_kv_heads=problem.num_kv_heads,
        L=L,
        S=S,
        E=problem.E,
        Ev=problem.Ev,
        dtype=problem.dtype,
        is_causal=False,
        scale=problem.scale,
        return_lse=True,
        on_device=False,
        mod_args=problem.mod_args,
        score_mod=at_positions(problem.score_mod, b, first, True),
        mask_mod=at_positions(problem.mask_mod, b, first, False),
        **fields,
    )


def at_positions(mod, b: int, first: int, is_score: bool):
    """A mod of one sequence's sub-problem (batch index 0, rows from 0) calling the caller's mod with
    the sequence's batch index and its positions (row i is the token at ``first + i``). A score
    mod's declared derivative (``score_grad``) is shifted the same way."""
    if mod is None:
        return None
    fn = python_function(mod)
    if not is_score:
        return lambda _b, h, i, j, *args: fn(b, h, i + first, j, *args)

    def shifted(score, _b, h, i, j, *args):
        return fn(score, b, h, i + first, j, *args)

    declared = getattr(mod, "score_grad", None) or getattr(fn, "score_grad", None)
    if declared is not None:
        grad = python_function(declared)
        shifted.score_grad = lambda score, _b, h, i, j, *args: grad(score, b, h, i + first, j, *args)
    return shifted
