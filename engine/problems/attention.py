"""The forward attention problem (``scaled_dot_product_attention``) and the checks that build it,
before any kernel runs.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or value)
with a message naming the argument and the shapes involved. The result is an
:class:`AttentionProblem`: the normalised description every backend's forward op consumes.
:class:`BackwardProblem` (built by ``engine.problems.backward``) adds what the gradients need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .arrays import array_dtype, as_array, check_float, is_device_array, is_floating
from .base import Problem, Requirement, check_bool, check_scale, real_float
from .causal import as_causal_bias
from .mods import validate_mods
from .sinks import validate_sinks

__all__ = ["AttentionProblem", "BackwardProblem", "validate_attention_args", "validate_dropout"]


@dataclass(frozen=True, kw_only=True)
class AttentionProblem(Problem):
    """A validated attention call: arrays plus every size a backend needs.

    ``query``/``key``/``value`` are NumPy arrays for host inputs (any strides) or the caller's
    device arrays. Shapes are ``batch_shape + (num_q_heads, L, E)`` and
    ``batch_shape + (num_kv_heads, S, E or Ev)``. ``attn_mask`` is ``None`` or an array
    broadcastable to ``batch_shape + (num_q_heads, L, S)``; ``mask_kind`` is ``"bool"``
    (True = may attend) or ``"float"`` (added to the scores).

    ``dropout_p`` > 0 drops attention weights with the counter-based stream keyed by
    ``dropout_seed`` (an int in 0 ... 2**64 - 1; see ``engine.kernels.philox``).
    """

    missing_op_reason: ClassVar[str] = "no forward pass in this backend"

    key: Any
    value: Any
    attn_mask: Any
    mask_kind: str | None
    batch_shape: tuple
    #: the output's shape without (L, Ev): ``batch_shape + (num_q_heads,)``, or ``()`` for 2-D inputs
    lead_shape: tuple
    S: int
    is_causal: bool
    block_mask: Any = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    #: set on forward problems whose gradient will be asked for (``engine.torch``), so that
    #: dispatch picks a backend whose backward op can run it too
    needs_backward: bool = False
    #: with ``is_causal``: query i sees keys j <= i + causal_offset (0: top left, as torch's
    #: ``is_causal``; S - L: bottom right, from ``engine.causal_lower_right``)
    causal_offset: int = 0
    #: for 16-bit inputs, return lse in float32 instead of the input dtype (``engine.torch`` keeps
    #: it for the backward, as FlashAttention does: a bfloat16 lse puts the recomputed weights off
    #: by up to 3%); honoured by ``cpu`` and ``reference``
    lse_float32: bool = False
    #: the shapes of query, key and value as the caller passed them (``query``/``key``/``value``
    #: hold their broadcast views): the gradients are summed back to these
    input_shapes: tuple = ()

    @property
    def batch(self) -> int:
        """Product of the leading (batch) dimensions."""
        return math.prod(self.batch_shape)

    @property
    def out_shape(self) -> tuple:
        """Shape of the result: the broadcast leading dims, then (L, Ev)."""
        return self.lead_shape + (self.L, self.Ev)

    @property
    def lse_shape(self) -> tuple:
        """Shape of the log-sum-exp: the broadcast leading dims, then L."""
        return self.lead_shape + (self.L,)

    @property
    def shape4(self) -> tuple:
        """(batch, q heads, L, Ev): the flattened shape kernels write."""
        return (self.batch, self.num_q_heads, self.L, self.Ev)

    @property
    def flops(self) -> int:
        """Multiply-adds of both products, times two (no causal discount)."""
        return 2 * self.batch * self.num_q_heads * self.L * self.S * (self.E + self.Ev)

    @property
    def is_empty(self) -> bool:
        """No score exists (L, S, batch or heads 0) or the output is empty (Ev 0): the public
        functions answer without a backend."""
        return 0 in (self.L, self.S, self.batch, self.num_q_heads, self.Ev)

    def requirements(self) -> list[Requirement]:
        reqs = super().requirements()
        if self.dropout_p > 0:
            reqs.append(Requirement("supports_dropout", True, "dropout_p > 0 is not supported by this backend"))
        if self.causal_offset:
            reqs.append(
                Requirement(
                    "supports_causal_offset",
                    True,
                    "a bottom-right causal mask (causal_lower_right with L != S) is not supported by this backend",
                )
            )
        return reqs

    def also_runs(self) -> tuple:
        return (BackwardProblem,) if self.needs_backward else ()


@dataclass(frozen=True, kw_only=True)
class BackwardProblem(AttentionProblem):
    """A validated ``scaled_dot_product_attention_backward`` call: the forward's problem plus
    ``grad_out`` and ``out`` (of ``out_shape``), ``lse`` (of ``lse_shape``), whether the float
    mask's gradient is wanted, and ``score_grad``, the compiled derivative of ``score_mod`` with
    respect to the score.

    ``grad_lse`` (of ``lse_shape``, or None for zero) is the gradient of the loss with respect
    to ``lse``. ``mod_args_grad`` has one bool per ``mod_args`` entry, True for the float arrays
    whose gradient is wanted (``()`` for none), and ``arg_grad`` is the compiled per-score step
    that computes it (``engine.problems.mod_args_grad``; None without a score_mod: then those
    gradients are zero)."""

    missing_op_reason: ClassVar[str] = "no backward pass (gradients) in this backend"

    needs_backward: bool = True
    grad_out: Any = None
    out: Any = None
    lse: Any = None
    return_mask_grad: bool = False
    score_grad: Any = None
    grad_lse: Any = None
    mod_args_grad: tuple = ()
    arg_grad: Any = None

    def requirements(self) -> list[Requirement]:
        reqs = super().requirements()
        if self.grad_lse is not None:
            reqs.append(
                Requirement("supports_lse_grad", True, "a gradient through lse is not computed by this backend")
            )
        if self.mod_args_grad:
            reqs.append(
                Requirement("supports_mod_args_grad", True, "gradients of mod_args are not computed by this backend")
            )
        if self.sinks is not None:  # its weights must come from the given lse' (engine.problems.sinks)
            reqs.append(Requirement("supports_sinks", True, "sinks are not supported by this backend's backward"))
        return reqs

    def also_runs(self) -> tuple:
        return ()


def validate_attention_args(
    query,
    key,
    value,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
    dropout_p=0.0,
    dropout_seed=None,
    draw_seed=True,
    sinks=None,
) -> AttentionProblem:
    """Check every argument of ``scaled_dot_product_attention`` and describe the problem.

    ``draw_seed``: with ``dropout_p > 0`` and no ``dropout_seed``, draw one from NumPy's global
    generator (as torch draws from its own); when False the seed is required. ``sinks``: (Hq,)
    floats or None (``engine.problems.sinks``).
    Raises ``TypeError``/``ValueError`` naming the argument and shapes; never touches a kernel.
    """
    q = as_array(query, "query")
    k = as_array(key, "key")
    v = as_array(value, "value")
    on_device = [type(a) is not np.ndarray and is_device_array(a) for a in (q, k, v)]
    if any(on_device) and not all(on_device):
        raise TypeError(
            "query, key and value must all be host arrays or all be device arrays; "
            f"device arrays: query={on_device[0]}, key={on_device[1]}, value={on_device[2]}"
        )

    input_shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    dtypes = [check_float(a, n) for a, n in ((q, "query"), (k, "key"), (v, "value"))]
    if len(set(dtypes)) != 1:
        raise TypeError(f"query, key and value must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}")
    dtype = dtypes[0]

    enable_gqa = check_bool(enable_gqa, "enable_gqa")
    q, k, v, lead_shape, batch_shape, Hq, H = _broadcast_heads(q, k, v, enable_gqa, on_device[0])
    qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    L, E = qs[-2], qs[-1]
    S, Ev = ks[-2], vs[-1]

    is_causal = check_bool(is_causal, "is_causal")
    return_lse = check_bool(return_lse, "return_lse")
    scale_f = check_scale(scale, E, f"query={qs}")

    mask, mask_kind = None, None
    attn_mask, is_causal, causal_offset = _causal_bias(attn_mask, is_causal, L, S)
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as torch)")
        mask = as_array(attn_mask, "attn_mask")
        if is_device_array(mask) != on_device[0]:
            raise TypeError("attn_mask must live where query does (host or device)")
        mdtype = array_dtype(mask)
        if mdtype.kind == "b":
            mask_kind = "bool"
        elif is_floating(mdtype):
            mask_kind = "float"
        else:
            raise TypeError(
                f"attn_mask must be boolean (True = may attend) or floating (added to the scores), got dtype {mdtype}"
            )
        target = lead_shape + (L, S)
        mshape = tuple(mask.shape)
        ok = len(mshape) <= len(target) and all(m in (1, t) for m, t in zip(mshape[::-1], target[::-1]))
        if not ok:
            raise ValueError(
                f"attn_mask of shape {mshape} is not broadcastable to the score shape {target} (batch..., heads, L, S)"
            )

    mods = validate_mods(score_mod, mask_mod, block_mask, mod_args, math.prod(batch_shape), Hq, L, S)
    p, seed = validate_dropout(dropout_p, dropout_seed, draw_seed)
    sinks = validate_sinks(sinks, Hq)

    return AttentionProblem(
        query=q,
        key=k,
        value=v,
        attn_mask=mask,
        mask_kind=mask_kind,
        batch_shape=tuple(batch_shape),
        lead_shape=lead_shape,
        num_q_heads=Hq,
        num_kv_heads=H,
        L=L,
        S=S,
        E=E,
        Ev=Ev,
        dtype=np.dtype(dtype),
        is_causal=is_causal,
        scale=scale_f,
        return_lse=return_lse,
        on_device=on_device[0],
        dropout_p=p,
        dropout_seed=seed,
        causal_offset=causal_offset,
        sinks=sinks,
        input_shapes=input_shapes,
        **mods,
    )


def validate_dropout(dropout_p, dropout_seed, draw_seed: bool):
    """``(p, seed)``: p a float in [0, 1]; seed an int in [0, 2**64) when p > 0, else None."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, (int, float, np.integer, np.floating)):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    p = real_float(dropout_p, "dropout_p", "be between 0 and 1")
    if not 0.0 <= p <= 1.0:  # NaN fails too
        raise ValueError(f"dropout_p must be between 0 and 1, got {p}")
    if dropout_seed is not None:
        if isinstance(dropout_seed, (bool, np.bool_)) or not isinstance(dropout_seed, (int, np.integer)):
            raise TypeError(f"dropout_seed must be an int or None, got {type(dropout_seed).__name__}")
        if not 0 <= int(dropout_seed) < 2**64:
            raise ValueError(f"dropout_seed must be in 0 ... 2**64 - 1, got {int(dropout_seed)}")
    if p == 0.0:
        return 0.0, None
    if dropout_seed is None:
        if not draw_seed:
            raise ValueError(
                "dropout_p > 0 needs dropout_seed: pass the seed the forward used, so "
                "the backward regenerates the same dropout mask"
            )
        # NumPy's global generator, as torch's dropout draws from torch's: np.random.seed() repeats it
        dropout_seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
    return p, int(dropout_seed)


def _causal_bias(attn_mask, is_causal, L: int, S: int):
    """``(attn_mask, is_causal, causal_offset)``: a ``CausalBias`` mask becomes a causal flag with
    its diagonal offset (no L x S array); any other mask passes through."""
    if attn_mask is None:
        return None, is_causal, 0
    bias = as_causal_bias(attn_mask)
    if bias is None:
        return attn_mask, is_causal, 0
    if is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch)")
    if bias.shape != (L, S):
        raise ValueError(f"attn_mask {bias!r} is for (L, S) = {bias.shape}, but the inputs have (L, S) = ({L}, {S})")
    return None, True, bias.diagonal_offset


def _broadcast_heads(q, k, v, enable_gqa: bool, on_device: bool):
    """Shapes of query, key and value checked, and their leading dims broadcast as torch does.

    Every input has at least 2 dims ``(..., rows, features)``; all 2-D is one head without batch.
    Otherwise the inputs are padded with leading 1s to one rank, dim -3 is the head axis and the
    dims before it are batch dims, broadcast as in ``torch.matmul`` (a key/value batch of 1
    serves every query batch). Heads: key and value heads broadcast to ``H``; the query's ``Hq``
    equals ``H``, or ``H`` is 1 (one key/value head for all: broadcast, the same as GQA with one
    group), or ``Hq`` is 1 (the query broadcasts to ``H`` heads), or ``enable_gqa`` and ``H``
    divides ``Hq``. Host arrays come back as zero-stride views of the broadcast shapes (no copy);
    device arrays as they are (the cuda backend indexes them through strides).

    Returns ``(q, k, v, lead_shape, batch_shape, Hq, H)``.
    """
    shapes = {n: tuple(a.shape) for n, a in (("query", q), ("key", k), ("value", v))}
    for n, shp in shapes.items():
        if len(shp) < 2:
            raise ValueError(f"{n} must have at least 2 dimensions (..., L, E), got shape {shp}")
    qs, ks, vs = shapes["query"], shapes["key"], shapes["value"]
    if qs[-1] != ks[-1]:
        raise ValueError(f"query and key must have the same feature size E, got query={qs}, key={ks}")
    if ks[-2] != vs[-2]:
        raise ValueError(f"key and value must have the same sequence length S, got key={ks}, value={vs}")
    rank = max(len(qs), len(ks), len(vs))
    if rank == 2:
        return q, k, v, (), (), 1, 1
    qp, kp, vp = ((1,) * (rank - len(s)) + s for s in (qs, ks, vs))
    try:  # (np.broadcast_shapes costs microseconds: only when the batch shapes differ)
        batch_shape = qp[:-3] if qp[:-3] == kp[:-3] == vp[:-3] else np.broadcast_shapes(qp[:-3], kp[:-3], vp[:-3])
    except ValueError:
        raise ValueError(
            "the batch dimensions of query, key and value must broadcast (as torch.matmul), "
            f"got shapes query={qs}, key={ks}, value={vs}"
        ) from None
    hq, hk, hv = qp[-3], kp[-3], vp[-3]
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(
            f"key and value must have the same number of heads (or one of them 1), got key={ks}, value={vs}"
        )
    H = max(hk, hv)
    if H == 0 and hq != 0:  # checked first: no head count divides by 0 (nor serves a query head)
        raise ValueError(
            f"key/value have 0 heads but query has {hq}: every query head needs a key/value head "
            f"(query={qs}, key={ks}, value={vs})"
        )
    if hq == H or H == 1:
        Hq = hq
    elif hq == 1 and not enable_gqa:
        Hq = H
    elif not enable_gqa:
        raise ValueError(
            f"query has {hq} heads but key/value have {H}; pass enable_gqa=True for "
            f"grouped-query attention (query={qs}, key={ks})"
        )
    elif hq % H:
        raise ValueError(
            f"enable_gqa=True needs the query head count to be a multiple of the "
            f"key/value head count, got {hq} and {H} (query={qs}, key={ks})"
        )
    else:
        Hq = hq
    batch_shape = tuple(batch_shape)
    lead = batch_shape + (Hq,)
    want = {"query": lead + qs[-2:], "key": batch_shape + (H,) + ks[-2:], "value": batch_shape + (H,) + vs[-2:]}
    if not on_device:  # zero-stride views where an input broadcasts; nothing copied
        q, k, v = (
            a if tuple(a.shape) == want[n] else np.broadcast_to(a.reshape(p), want[n])
            for a, n, p in ((q, "query", qp), (k, "key", kp), (v, "value", vp))
        )
    return q, k, v, lead, batch_shape, Hq, H
