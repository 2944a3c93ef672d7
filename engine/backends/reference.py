"""The ``reference`` backend: plain NumPy, materialises the score matrix. The test oracle."""

from __future__ import annotations

import numpy as np

from ..materialised import add_nonfinite_values, dropout_multipliers, gradients, scores, softmax
from ..mods import python_function
from ..validation import AttentionProblem
from .base import Backend

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy, materialised float64 scores; the oracle the other backends are tested against"
    # bfloat16 is ml_dtypes' NumPy dtype: computed in float64 like the others, rounded once
    dtypes = ("float16", "float32", "float64", "bfloat16")
    supports_mods = True
    supports_backward = True
    supports_dropout = True
    supports_causal_offset = True
    supports_decode = True
    decode_dtypes = dtypes
    decode_cache_dtypes = ("float16", "float32", "float64", "bfloat16")
    priority = 0

    def run(self, problem):
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
        return out.astype(problem.dtype), lse.astype(problem.dtype)

    def run_backward(self, problem):
        dq, dk, dv, dmask = gradients(problem)
        return dq.astype(problem.dtype), dk.astype(problem.dtype), dv.astype(problem.dtype), dmask

    def decode(self, problem):
        """Write the new entries, then each sequence is one materialised attention over the keys it
        sees (gathered through its pages), with its causal/window rows as a boolean mask and the mods
        shifted to absolute positions: the decoding oracle is the forward oracle."""
        from ..kvcache import new_entries_written

        with new_entries_written(problem):  # undone if the attention below raises
            return self._decode(problem)

    def _decode(self, problem):
        from ..kvcache import gather_sequence

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
            out[b], lse[b] = self.run(sub)
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
