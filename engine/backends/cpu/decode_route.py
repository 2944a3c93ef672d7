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

import threading

import numpy as np

from ...plugins.manager import add_listener
from ...problems.attention import AttentionProblem
from ...problems.decode import DecodeProblem, validate_decode_args
from ...runtime.config import DECODE_FUSED_ROWS, DECODE_ROUTE_FLOAT_ROWS
from ...runtime.process_state import runtime_token
from .operands import as4, narrow, widen

__all__ = ["decode_shaped", "decode_route", "run_as_decode", "DecodeRoute"]


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


#: the runners by signature, for every number of keys: a model's decode steps pass one more key
#: each step (transformers' caches grow by concatenation), so a runner per S would be made per
#: step (validation and set-up: about 200 us of a 360 us step in a Llama layer, Zen 4). Calls
#: without a call plan (``engine.torch``'s tensors have none) and each new S's call plan take the
#: signature's runner from here. Forgotten as the call plans are (``engine.plan``: a plugin
#: registered; the thread count, provider and tuning state are in the key)
_routes: dict = {}
_lock = threading.Lock()
#: the most runners kept (all are forgotten when full, as ``engine.plan`` does with its plans)
_MAX_ROUTES = 512


def _signature(problem: AttentionProblem, op) -> tuple:
    """What a :class:`DecodeRoute` is made for: the arrays' types and shapes but the keys' count,
    the heads, the causal flag (bottom right: the offset follows S), the lse's dtype, the runtime."""
    q, k, v = problem.query, problem.key, problem.value
    return (
        (q.shape, q.dtype, q.flags.num),
        (k.shape[:-2], k.shape[-1], k.dtype, k.flags.num),
        (v.shape[:-2], v.shape[-1], v.dtype, v.flags.num),
        problem.num_q_heads,
        problem.is_causal,
        problem.lse_float32,
        problem.lead_shape,
        runtime_token(),
        id(op),
    )


def decode_route(problem: AttentionProblem, op) -> DecodeRoute:
    """The :class:`DecodeRoute` of a :func:`decode_shaped` problem's signature on ``op`` (the
    backend's decode op), made on first use."""
    key = _signature(problem, op)
    route = _routes.get(key)
    if route is None:
        route = DecodeRoute(problem, op)
        with _lock:
            if len(_routes) >= _MAX_ROUTES:
                _routes.clear()
            _routes[key] = route
    return route


def run_as_decode(problem: AttentionProblem, op):
    """``(out, lse)`` of a :func:`decode_shaped` problem on ``op`` (the backend's decode op), in
    the problem's shapes and dtype."""
    return decode_route(problem, op)(problem)


def forget_routes() -> None:
    """Forget every stored :class:`DecodeRoute`."""
    with _lock:
        _routes.clear()


add_listener(forget_routes)


class DecodeRoute:
    """A prepared runner for a :func:`decode_shaped` signature, any number of keys: the decode op's
    own prepared runner, a decode problem rebuilt per call from the first's (the arrays, the keys'
    count and the scale change), and ``plain``, the decode op's shortest path, where a forward
    call plan hands over 4-D arrays as the caller gave them."""

    __slots__ = ("runner", "fields", "plain", "_decode_plain", "_shapes", "_narrow")

    def __init__(self, problem: AttentionProblem, op):
        first = _decode_problem(problem)
        self.runner = op.prepare(first)
        self.fields = dict(first.__dict__)
        self._narrow = problem.dtype if _wide_query(problem) else None
        self._shapes = (problem.out_shape, problem.lse_shape)
        self._decode_plain = getattr(self.runner, "plain", None)
        # the plain path takes the caller's arrays as they are: (batch, heads, rows, features), C order
        arrays = (problem.query, problem.key, problem.value)
        as_given = all(a.ndim == 4 and a.shape[0] == problem.batch and a.flags.c_contiguous for a in arrays)
        self.plain = self._plain if self._decode_plain is not None and as_given else None

    def __call__(self, problem: AttentionProblem):
        """``(out, lse)`` of a problem with this runner's signature."""
        B, S = problem.batch, problem.S
        fields = self.fields.copy()
        fields["query"] = _query(problem)
        fields["k_cache"] = as4(problem.key, B)
        fields["v_cache"] = as4(problem.value, B)
        fields["scale"] = problem.scale
        fields["cache_seqlens"] = np.full(B, S, dtype=np.int64)
        fields["capacity"] = fields["page_size"] = S
        decode = object.__new__(DecodeProblem)  # (as engine.plan.fast_problem: no __init__ per call)
        object.__setattr__(decode, "__dict__", fields)
        out, lse = self.runner(decode)
        if self._narrow is not None:
            out = narrow(out, self._narrow)
        return out.reshape(self._shapes[0]), lse.reshape(self._shapes[1])

    def _plain(self, q, k, v, scale, mod_args):
        B, S = k.shape[0], k.shape[2]
        seqlens = np.full(B, S, dtype=np.int64)
        return self._decode_plain(q, k, v, None, None, seqlens, S, B * S, scale, ())
