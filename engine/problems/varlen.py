"""The packed variable-length problem (``varlen_attention``) and its backward, with the checks that
build them before any kernel runs.

Sequences of different lengths are packed along one axis, FlashAttention's
``flash_attn_varlen_func`` layout: query ``(total_q, Hq, E)``, key ``(total_k, H, E)``, value
``(total_k, H, Ev)``, and sequence b owns query rows ``cu_seqlens_q[b] ... cu_seqlens_q[b+1] - 1``
and key rows ``cu_seqlens_k[b] ... cu_seqlens_k[b+1] - 1``. Errors are ``TypeError`` (wrong kind
of thing) or ``ValueError`` (wrong shape or value) naming the argument and the shapes.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .arrays import as_array, check_float, is_device_array
from .base import Problem, Requirement, check_bool, check_scale
from .decode import _window as window_arg
from .mod_bounds import probe_mod_bounds
from .mods import score_mod_grad, validate_mods
from .packed import check_cu_seqlens
from .sinks import validate_sinks

__all__ = ["VarlenProblem", "VarlenBackwardProblem", "validate_varlen_args", "validate_varlen_backward_args"]


@dataclass(frozen=True, kw_only=True)
class VarlenProblem(Problem):
    """A validated ``varlen_attention`` call.

    ``query``/``key``/``value`` are the packed arrays (NumPy for host inputs, else the caller's
    device arrays); ``L`` is ``total_q`` and ``total_k`` the key rows. ``cu_seqlens_q``/
    ``cu_seqlens_k`` are int64 copies ``(B + 1,)``. Query row i of sequence b is the token at
    position ``len_k[b] - len_q[b] + i`` (bottom-right alignment): with ``is_causal`` it sees keys
    ``j <= position``, and ``window = (left, right)`` (-1: unbounded) limits it to
    ``position - left <= j <= position + right``.
    """

    missing_op_reason: ClassVar[str] = "packed variable-length attention (varlen_attention) is not supported"

    key: Any
    value: Any
    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    total_k: int
    max_seqlen_q: int
    max_seqlen_k: int
    is_causal: bool
    window: tuple

    @property
    def batch(self) -> int:
        return len(self.cu_seqlens_q) - 1

    @property
    def seqlens_q(self) -> np.ndarray:
        return np.diff(self.cu_seqlens_q)

    @property
    def seqlens_k(self) -> np.ndarray:
        return np.diff(self.cu_seqlens_k)

    @property
    def S(self) -> int:
        """The longest sequence's keys (what a mod's kv_idx ranges over)."""
        return self.max_seqlen_k

    @property
    def out_shape(self) -> tuple:
        return (self.L, self.num_q_heads, self.Ev)

    @property
    def lse_shape(self) -> tuple:
        """``(total_q, Hq)``: the output's shape without its last axis, as every engine lse (so
        ``merge_attention`` and the sink step apply); FlashAttention's is the transpose."""
        return (self.L, self.num_q_heads)

    @property
    def flops(self) -> int:
        """Multiply-adds of both products, times two, over every sequence (no causal discount)."""
        return 2 * self.num_q_heads * int(np.dot(self.seqlens_q, self.seqlens_k)) * (self.E + self.Ev)

    @property
    def is_empty(self) -> bool:
        """No score exists or the output is empty: the public function answers without a backend."""
        return self.L == 0 or self.total_k == 0 or self.Ev == 0


@dataclass(frozen=True, kw_only=True)
class VarlenBackwardProblem(VarlenProblem):
    """A validated ``varlen_attention_backward`` call: the forward's problem plus ``grad_out`` and
    ``out`` (``(total_q, Hq, Ev)``), ``lse`` (``(total_q, Hq)``; with sinks, the forward's with them)
    and ``score_grad``, the compiled derivative of ``score_mod`` with respect to the score.
    ``grad_lse`` (``(total_q, Hq)``, or None for zero) is the gradient of the loss with respect to
    ``lse``."""

    missing_op_reason: ClassVar[str] = "no backward pass (gradients) of varlen_attention in this backend"

    grad_out: Any = None
    out: Any = None
    lse: Any = None
    score_grad: Any = None
    grad_lse: Any = None

    def requirements(self) -> list[Requirement]:
        reqs = super().requirements()
        if self.grad_lse is not None:
            reqs.append(
                Requirement("supports_lse_grad", True, "a gradient through lse is not computed by this backend")
            )
        if self.sinks is not None:  # its weights must come from the given lse' (engine.problems.sinks)
            reqs.append(Requirement("supports_sinks", True, "sinks are not supported by this backend's backward"))
        return reqs


def validate_varlen_args(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    is_causal=False,
    scale=None,
    window=None,
    sinks=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    return_lse=False,
) -> VarlenProblem:
    """Check every argument of ``varlen_attention`` and describe the call; runs no kernel."""
    q, k, v = (as_array(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    on_device = [is_device_array(a) for a in (q, k, v)]
    if any(on_device) and not all(on_device):
        raise TypeError(
            "query, key and value must all be host arrays or all be device arrays; "
            f"device arrays: query={on_device[0]}, key={on_device[1]}, value={on_device[2]}"
        )
    dtypes = [check_float(a, n) for a, n in ((q, "query"), (k, "key"), (v, "value"))]
    if len(set(dtypes)) != 1:
        raise TypeError(f"query, key and value must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}")
    qs, ks, vs = (tuple(a.shape) for a in (q, k, v))
    for name, shape, what in (
        ("query", qs, "(total_q, Hq, E)"),
        ("key", ks, "(total_k, H, E)"),
        ("value", vs, "(total_k, H, Ev)"),
    ):
        if len(shape) != 3:
            raise ValueError(f"{name} must be packed {what} (FlashAttention's varlen layout), got shape {shape}")
    total_q, Hq, E = qs
    total_k, H, _ = ks
    Ev = vs[2]
    if ks[2] != E:
        raise ValueError(f"query and key must have the same head size E, got query {qs} and key {ks}")
    if vs[:2] != ks[:2]:
        raise ValueError(f"key and value must have the same rows and heads, got key {ks} and value {vs}")
    if H < 1 or Hq < 1 or Hq % H:
        raise ValueError(
            f"the key/value head count must divide the query's (grouped-query attention), got {Hq} "
            f"query heads and {H} key/value heads (query {qs}, key {ks})"
        )
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q, f"query {qs}")
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k, f"key {ks}")
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same sequences, got {len(cu_q) - 1} "
            f"and {len(cu_k) - 1} (shapes {cu_q.shape} and {cu_k.shape})"
        )
    B = len(cu_q) - 1
    max_q = int(np.diff(cu_q).max()) if B else 0
    max_k = int(np.diff(cu_k).max()) if B else 0
    is_causal = check_bool(is_causal, "is_causal")
    return_lse = check_bool(return_lse, "return_lse")
    scale_f = check_scale(scale, E, f"query={qs}")
    mods = validate_mods(score_mod, mask_mod, None, mod_args, max(B, 1), Hq, max_q, max_k, probe=False)
    mods.pop("block_mask", None)
    if mods.get("score_mod") is not None or mods.get("mask_mod") is not None:
        _probe_sequences(mods, Hq, np.diff(cu_q), np.diff(cu_k))
    return VarlenProblem(
        query=q,
        key=k,
        value=v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        total_k=total_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        num_q_heads=Hq,
        num_kv_heads=H,
        L=total_q,
        E=E,
        Ev=Ev,
        dtype=np.dtype(dtypes[0]),
        is_causal=is_causal,
        window=window_arg(window),
        scale=scale_f,
        return_lse=return_lse,
        on_device=on_device[0],
        sinks=validate_sinks(sinks, Hq),
        **mods,
    )


def validate_varlen_backward_args(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    is_causal=False,
    scale=None,
    window=None,
    sinks=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    grad_lse=None,
) -> VarlenBackwardProblem:
    """The forward's checks (same messages), then ``grad_out``/``out`` (the forward's output shape
    and dtype), ``lse`` and ``grad_lse`` (``(total_q, Hq)``, at least as precise as the query; None
    for no ``grad_lse``) and the score_mod's derivative; runs no kernel."""
    problem = validate_varlen_args(
        query, key, value, cu_seqlens_q, cu_seqlens_k, is_causal, scale, window, sinks, score_mod, mask_mod, mod_args
    )
    arrays = {"grad_lse": None}
    for name, x, shape in (
        ("grad_out", grad_out, problem.out_shape),
        ("out", out, problem.out_shape),
        ("lse", lse, problem.lse_shape),
        ("grad_lse", grad_lse, problem.lse_shape),
    ):
        if x is None and name == "grad_lse":
            continue
        arr = as_array(x, name)
        if is_device_array(arr) != problem.on_device:
            raise TypeError(f"{name} must live where query does (host or device)")
        dtype = check_float(arr, name)
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (from query {tuple(problem.query.shape)} and value "
                f"{tuple(problem.value.shape)}), got {tuple(arr.shape)}"
            )
        lse_like = name in ("lse", "grad_lse")
        if not lse_like and dtype != problem.dtype:
            raise TypeError(f"{name} must have the dtype of query ({problem.dtype}), got {dtype}")
        if lse_like and np.dtype(dtype).itemsize < problem.dtype.itemsize:
            raise TypeError(f"{name} must be at least as precise as query ({problem.dtype}), got {dtype}")
        arrays[name] = arr
    score_grad = None
    if problem.score_mod is not None:  # checked at indices within the longest sequence
        where = types.SimpleNamespace(
            dtype=problem.dtype,
            batch=max(problem.batch, 1),
            num_q_heads=problem.num_q_heads,
            L=problem.max_seqlen_q,
            S=problem.max_seqlen_k,
            score_mod=problem.score_mod,
            mod_args=problem.mod_args,
        )
        score_grad = score_mod_grad(score_mod, where)
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(VarlenProblem)}
    return VarlenBackwardProblem(**fields, score_grad=score_grad, **arrays)


#: up to this many sequences are probed each (``_probe_sequences``); more, only the extreme ones
PROBED_SEQUENCES = 64


def _probe_sequences(mods: dict, heads: int, len_q: np.ndarray, len_k: np.ndarray) -> None:
    """``probe_mod_bounds`` at each sequence's own corners: ``b``, ``q_idx`` from ``len_k - len_q``
    to ``len_k - 1`` and ``kv_idx < len_k`` (the batch's longest ranges paired with every ``b``
    refused a mod reading a per-token table through per-sequence starts; found by a trial). Of
    more than :data:`PROBED_SEQUENCES` sequences, the first, the last and those with the most
    query rows, the most keys and the lowest ``q_idx``."""
    seqs = np.nonzero(len_q > 0)[0]
    if seqs.size > PROBED_SEQUENCES:
        offsets = (len_k - len_q)[seqs]
        extremes = (0, -1, np.argmax(len_q[seqs]), np.argmax(len_k[seqs]), np.argmin(offsets))
        seqs = np.unique(seqs[list(extremes)])
    for b in seqs.tolist():
        nq, nk = int(len_q[b]), int(len_k[b])
        ranges = {"b": (b, b), "h": (0, heads - 1), "q_idx": (nk - nq, nk - 1), "kv_idx": (0, nk - 1)}
        probe_mod_bounds(mods["score_mod"], mods["mask_mod"], mods["mod_args"], ranges)
