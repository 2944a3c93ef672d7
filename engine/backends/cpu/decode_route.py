"""Forward problems shaped like a decode step run on the ``cpu`` decode op (``decode.CpuDecode``).

A ``scaled_dot_product_attention`` call with a few query rows against many keys and nothing else
(a transformers model's decode step, where the layer passes its cache as k and v with L = 1) is
``attention_with_kvcache`` without new entries: ``cache_seqlens = S``, non-causal, or causal
bottom right. The decode kernels read each key and value row once in place (one query row: the
matrix-vector kernel, ``engine.kernels.cpu.decode_gemv``); the forward kernel multiplies tiles
that such a call fills with a row or a few, and its 16-bit path pads them to 32 rows. On AMD Zen 4
(12 heads, head 64, one query row, 2 threads) the forward kernel took 130 us at S = 1024 in
float32 and 1071 us in bfloat16, the decode op 59 and 145 (torch: 117 and 731); at S = 4096,
749 and 2842 against 310 and 523 (docs/performance.md). So the forward op hands such problems to
the decode op (:func:`decode_shaped`), with the same results up to rounding.
"""

from __future__ import annotations

import numpy as np

from ...problems.attention import AttentionProblem
from ...problems.decode import DecodeProblem, validate_decode_args
from ...runtime.config import DECODE_FUSED_ROWS, DECODE_ROUTE_FLOAT_ROWS
from .operands import as4, narrow, widen

__all__ = ["decode_shaped", "run_as_decode", "DecodeRoute"]


def decode_shaped(problem: AttentionProblem) -> bool:
    """Whether the decode op takes ``problem``: host arrays, key and value C-contiguous (read in
    place as caches), at most ``DECODE_FUSED_ROWS`` query rows per key head (L x group) and in
    float32/float64 at most ``DECODE_ROUTE_FLOAT_ROWS`` (where the forward kernel's tiles were as
    fast), L <= S, no mask, mods or dropout, not causal or causal bottom right, and k and v apart
    in memory (as caches must be)."""
    return (
        not problem.on_device
        and problem.attn_mask is None
        and not problem.has_mods
        and problem.dropout_p == 0
        and problem.L * problem.group <= DECODE_FUSED_ROWS
        and (problem.L <= DECODE_ROUTE_FLOAT_ROWS or problem.dtype.itemsize == 2)
        and 0 < problem.L <= problem.S
        and problem.E > 0
        and problem.Ev > 0
        and (not problem.is_causal or problem.causal_offset == problem.S - problem.L)
        and problem.key.flags.c_contiguous
        and problem.value.flags.c_contiguous
        and not np.may_share_memory(problem.key, problem.value)  # (the decode op's caches may not)
    )


def _wide_query(problem: AttentionProblem) -> bool:
    """Whether the decode problem takes the query widened to float32: a 16-bit problem that wants
    its lse in float32 (``engine.torch``'s), which the decode op gives for a float32 query (it
    computes in float32 either way) and rounds to the query's dtype otherwise."""
    return problem.lse_float32 and problem.dtype.itemsize == 2


def _query(problem: AttentionProblem) -> np.ndarray:
    q = as4(problem.query, problem.batch)
    return widen(q) if _wide_query(problem) else q


def _decode_problem(problem: AttentionProblem) -> DecodeProblem:
    """The decode problem of a :func:`decode_shaped` one (validated as ``attention_with_kvcache``
    validates; the arrays as (batch, heads, rows, features) views)."""
    B = problem.batch
    q, k, v = (_query(problem),) + tuple(as4(a, B) for a in (problem.key, problem.value))
    return validate_decode_args(
        q,
        k,
        v,
        cache_seqlens=np.full(B, problem.S, dtype=np.int64),
        is_causal=problem.is_causal,
        scale=problem.scale,
        return_lse=True,
    )


def run_as_decode(problem: AttentionProblem, op):
    """``(out, lse)`` of a :func:`decode_shaped` problem on ``op`` (the backend's decode op), in
    the problem's shapes and dtype."""
    out, lse = op.run(_decode_problem(problem))
    if _wide_query(problem):
        out = narrow(out, problem.dtype)  # (rounded to nearest even, as the decode op rounds)
    return out.reshape(problem.out_shape), lse.reshape(problem.lse_shape)


class DecodeRoute:
    """A prepared runner (``CpuForward.prepare``) for a :func:`decode_shaped` signature: the decode
    op's own prepared runner, a decode problem rebuilt per call from the signature's (only the
    arrays and the scale change), and ``plain``, the decode op's shortest path, where the forward
    plan hands over 4-D arrays as the caller gave them."""

    __slots__ = ("runner", "fields", "plain", "_decode_plain", "_seqlens", "_most", "_total", "_shapes", "_narrow")

    def __init__(self, problem: AttentionProblem, op):
        first = _decode_problem(problem)
        self.runner = op.prepare(first)
        self.fields = dict(first.__dict__)
        self._narrow = problem.dtype if _wide_query(problem) else None
        self._shapes = (problem.out_shape, problem.lse_shape)
        self._seqlens = first.seqlens_k
        self._most, self._total = problem.S, problem.S * problem.batch
        self._decode_plain = getattr(self.runner, "plain", None)
        four_d = all(a.ndim == 4 and a.shape[0] == problem.batch for a in (problem.query, problem.key, problem.value))
        self.plain = self._plain if self._decode_plain is not None and four_d else None

    def __call__(self, problem: AttentionProblem):
        B = problem.batch
        fields = self.fields.copy()
        fields["query"] = _query(problem)
        fields["k_cache"] = as4(problem.key, B)
        fields["v_cache"] = as4(problem.value, B)
        fields["scale"] = problem.scale
        decode = object.__new__(DecodeProblem)  # (as engine.plan.fast_problem: no __init__ per call)
        object.__setattr__(decode, "__dict__", fields)
        out, lse = self.runner(decode)
        if self._narrow is not None:
            out = narrow(out, self._narrow)
        return out.reshape(self._shapes[0]), lse.reshape(self._shapes[1])

    def _plain(self, q, k, v, scale, mod_args):
        return self._decode_plain(q, k, v, None, None, self._seqlens, self._most, self._total, scale, ())
