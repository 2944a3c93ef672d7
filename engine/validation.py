"""Validation of ``scaled_dot_product_attention`` arguments, before any kernel runs.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or value)
with a message naming the argument and the shapes involved. The result is an
:class:`AttentionProblem`: the normalised description every backend consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "AttentionProblem",
    "validate_attention_args",
    "validate_backward_args",
    "array_dtype",
    "is_device_array",
    "native",
    "bfloat16_dtype",
    "is_bfloat16",
    "is_floating",
    "is_torch_bfloat16",
]


def is_device_array(x: Any) -> bool:
    """True for GPU arrays that expose ``__cuda_array_interface__`` (Numba, CuPy, torch CUDA)."""
    return hasattr(x, "__cuda_array_interface__")


def bfloat16_dtype() -> np.dtype:
    """NumPy's bfloat16 dtype, from ml_dtypes (NumPy has none of its own).

    ``TypeError`` when ml_dtypes is not installed (it comes with the ``cuda`` and ``test`` extras).
    """
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes, or the 'cuda' extra)"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: np.dtype) -> bool:
    """True for ml_dtypes' bfloat16 (a NumPy dtype of kind 'V' named 'bfloat16')."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


def is_floating(dtype: np.dtype) -> bool:
    """True for the floating dtypes the engine accepts: NumPy's, and ml_dtypes' bfloat16."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def is_torch_bfloat16(x: Any) -> bool:
    """True for a torch tensor of dtype ``torch.bfloat16`` (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == "torch.bfloat16"


def array_dtype(x: Any) -> np.dtype:
    """The NumPy dtype of a host or device array, without copying it (ml_dtypes' bfloat16 for
    torch ``bfloat16`` CUDA tensors, whose interface type is an anonymous 2-byte ``<V2``)."""
    if is_device_array(x):
        typestr = x.__cuda_array_interface__["typestr"]
        if typestr == "<V2" and is_torch_bfloat16(x):
            return bfloat16_dtype()
        return np.dtype(typestr)
    return x.dtype


def _as_array(x: Any, name: str) -> Any:
    """Host inputs become ``np.ndarray`` (torch CPU tensors included, bfloat16 ones as ml_dtypes'
    bfloat16); device arrays stay as they are."""
    if type(x) is np.ndarray:  # the common case, first: no device or torch checks to pay for
        return native(x)
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if is_device_array(x):
        return x
    try:
        if is_torch_bfloat16(x):
            import torch

            # NumPy has no bfloat16; ml_dtypes' holds the same bits (a view, no copy)
            return x.view(torch.uint16).numpy().view(bfloat16_dtype())
        arr = np.asarray(x)
    except Exception as exc:  # e.g. ragged nested lists
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    return native(arr)


def native(arr: np.ndarray, writeable: bool = False) -> np.ndarray:
    """``arr`` itself when its layout suits a kernel; otherwise a copy in native byte order and
    aligned memory (the values are unchanged). Numba compiles no big-endian array, and compiles a
    new specialisation (tens of seconds) for an unaligned one, or a read-only one: ``writeable``
    copies those too (for the small ``mod_args`` arrays; the caller's array is never written)."""
    if arr.dtype.isnative and arr.flags.aligned and (arr.flags.writeable or not writeable):
        return arr
    return np.require(arr, dtype=arr.dtype.newbyteorder("="), requirements="AW" if writeable else "A")


def native_mod_args(mod_args: tuple) -> tuple:
    """``mod_args`` with its NumPy arrays made native, aligned and writeable (see :func:`native`)."""
    return tuple(native(a, writeable=True) if isinstance(a, np.ndarray) else a for a in mod_args)


def _check_float(arr: Any, name: str) -> np.dtype:
    dtype = array_dtype(arr)
    if not is_floating(dtype):
        raise TypeError(
            f"{name} must have a floating dtype (float16, float32, float64, bfloat16), got {dtype} "
            f"with shape {tuple(arr.shape)}"
        )
    return dtype


@dataclass(frozen=True)
class AttentionProblem:
    """A validated attention call: arrays plus every size a backend needs.

    ``query``/``key``/``value`` are NumPy arrays for host inputs (any strides) or the caller's
    device arrays. Shapes are ``batch_shape + (num_q_heads, L, E)`` and
    ``batch_shape + (num_kv_heads, S, E or Ev)``. ``attn_mask`` is ``None`` or an array
    broadcastable to ``batch_shape + (num_q_heads, L, S)``; ``mask_kind`` is ``"bool"``
    (True = may attend) or ``"float"`` (added to the scores).

    ``dropout_p`` > 0 drops attention weights with the counter-based stream keyed by
    ``dropout_seed`` (an int in 0 ... 2**64 - 1; see ``engine.kernels.philox``).

    A backward problem (``needs_backward``) also holds ``grad_out`` and ``out`` (of
    ``out_shape``), ``lse`` (of ``lse_shape``), whether the float mask's gradient is wanted, and
    ``score_grad``, the compiled derivative of ``score_mod`` with respect to the score.
    """

    query: Any
    key: Any
    value: Any
    attn_mask: Any
    mask_kind: str | None
    batch_shape: tuple
    #: the output's shape without (L, Ev): ``batch_shape + (num_q_heads,)``, or ``()`` for 2-D inputs
    lead_shape: tuple
    num_q_heads: int
    num_kv_heads: int
    L: int
    S: int
    E: int
    Ev: int
    dtype: np.dtype
    is_causal: bool
    scale: float
    return_lse: bool
    on_device: bool
    #: compiled (``numba.njit``) mods and their argument tuple; see ``engine.mods``
    score_mod: Any = None
    mask_mod: Any = None
    mod_args: tuple = ()
    block_mask: Any = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    #: set on problems for the backward pass (and on forward problems whose gradient will be
    #: asked for, so that dispatch picks a backend that has a backward)
    needs_backward: bool = False
    grad_out: Any = None
    out: Any = None
    lse: Any = None
    return_mask_grad: bool = False
    score_grad: Any = None
    #: with ``is_causal``: query i sees keys j <= i + causal_offset (0: top left, as torch's
    #: ``is_causal``; S - L: bottom right, from ``engine.causal_lower_right``)
    causal_offset: int = 0

    @property
    def has_mods(self) -> bool:
        return self.score_mod is not None or self.mask_mod is not None

    @property
    def batch(self) -> int:
        """Product of the leading (batch) dimensions."""
        return math.prod(self.batch_shape)

    @property
    def group(self) -> int:
        """Query heads served by one key/value head (1 without GQA)."""
        return self.num_q_heads // self.num_kv_heads

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
) -> AttentionProblem:
    """Check every argument of ``scaled_dot_product_attention`` and describe the problem.

    ``draw_seed``: with ``dropout_p > 0`` and no ``dropout_seed``, draw one from NumPy's global
    generator (as torch draws from its own); when False the seed is required.
    Raises ``TypeError``/``ValueError`` naming the argument and shapes; never touches a kernel.
    """
    q = _as_array(query, "query")
    k = _as_array(key, "key")
    v = _as_array(value, "value")
    on_device = [type(a) is not np.ndarray and is_device_array(a) for a in (q, k, v)]
    if any(on_device) and not all(on_device):
        raise TypeError(
            "query, key and value must all be host arrays or all be device arrays; "
            f"device arrays: query={on_device[0]}, key={on_device[1]}, value={on_device[2]}"
        )

    dtypes = [_check_float(a, n) for a, n in ((q, "query"), (k, "key"), (v, "value"))]
    if len(set(dtypes)) != 1:
        raise TypeError(f"query, key and value must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}")
    dtype = dtypes[0]

    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    q, k, v, lead_shape, batch_shape, Hq, H = _broadcast_heads(q, k, v, bool(enable_gqa), on_device[0])
    qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    L, E = qs[-2], qs[-1]
    S, Ev = ks[-2], vs[-1]

    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")

    if scale is None:
        if E == 0:
            raise ValueError(f"the default scale 1/sqrt(E) needs E >= 1, got query={qs}; pass scale=")
        scale_f = 1.0 / math.sqrt(E)
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale must be finite, got {scale_f}")

    mask, mask_kind = None, None
    attn_mask, is_causal, causal_offset = _causal_bias(attn_mask, is_causal, L, S)
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as torch)")
        mask = _as_array(attn_mask, "attn_mask")
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

    mods = _validate_mods(score_mod, mask_mod, block_mask, mod_args, math.prod(batch_shape), Hq, L, S)
    p, seed = _validate_dropout(dropout_p, dropout_seed, draw_seed)

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
        is_causal=bool(is_causal),
        scale=scale_f,
        return_lse=bool(return_lse),
        on_device=on_device[0],
        dropout_p=p,
        dropout_seed=seed,
        causal_offset=causal_offset,
        **mods,
    )


def _validate_dropout(dropout_p, dropout_seed, draw_seed: bool):
    """``(p, seed)``: p a float in [0, 1]; seed an int in [0, 2**64) when p > 0, else None."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, (int, float, np.integer, np.floating)):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    p = float(dropout_p)
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


def validate_backward_args(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
    dropout_p=0.0,
    dropout_seed=None,
    return_mask_grad=False,
) -> AttentionProblem:
    """Check every argument of ``scaled_dot_product_attention_backward``: the forward's
    arguments (same checks, same messages), then ``grad_out``/``out`` (the forward's output
    shape and dtype), ``lse`` (the output shape without its last axis) and the mods' derivative.

    Raises ``TypeError``/``ValueError`` naming the argument and shapes; never touches a kernel.
    """
    problem = validate_attention_args(
        query,
        key,
        value,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        False,
        score_mod,
        mask_mod,
        block_mask,
        mod_args,
        dropout_p,
        dropout_seed,
        draw_seed=False,
    )
    arrays = {}
    for name, x, shape in (
        ("grad_out", grad_out, problem.out_shape),
        ("out", out, problem.out_shape),
        ("lse", lse, problem.lse_shape),
    ):
        arr = _as_array(x, name)
        if is_device_array(arr) != problem.on_device:
            raise TypeError(f"{name} must live where query does (host or device)")
        dtype = _check_float(arr, name)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(
                f"{name} must have shape {tuple(shape)} (from query {tuple(problem.query.shape)} "
                f"and value {tuple(problem.value.shape)}), got {tuple(arr.shape)}"
            )
        if name != "lse" and dtype != problem.dtype:
            raise TypeError(f"{name} must have the dtype of query ({problem.dtype}), got {dtype}")
        if name == "lse" and np.dtype(dtype).itemsize < problem.dtype.itemsize:  # the weights would lose digits
            raise TypeError(f"lse must be at least as precise as query ({problem.dtype}), got {dtype}")
        arrays[name] = arr
    if not isinstance(return_mask_grad, (bool, np.bool_)):
        raise TypeError(f"return_mask_grad must be a bool, got {type(return_mask_grad).__name__}")
    if return_mask_grad and problem.mask_kind != "float":
        raise ValueError(
            "return_mask_grad=True needs a floating attn_mask (a boolean mask or no mask "
            f"has no gradient), got {'no mask' if attn_mask is None else 'a boolean mask'}"
        )
    score_grad = None
    if problem.score_mod is not None:
        from .mods import score_mod_grad

        score_grad = score_mod_grad(score_mod, problem)
    return replace(
        problem,
        needs_backward=True,
        grad_out=arrays["grad_out"],
        out=arrays["out"],
        lse=arrays["lse"],
        return_mask_grad=bool(return_mask_grad),
        score_grad=score_grad,
    )


def _causal_bias(attn_mask, is_causal, L: int, S: int):
    """``(attn_mask, is_causal, causal_offset)``: a ``CausalBias`` mask becomes a causal flag with
    its diagonal offset (no L x S array); any other mask passes through."""
    if attn_mask is None:
        return None, is_causal, 0
    from .causal import as_causal_bias

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


def _validate_mods(score_mod, mask_mod, block_mask, mod_args, batch, heads, L, S) -> dict:
    """Compile the mods (once per function) and check the block mask against the problem."""
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    if score_mod is None and mask_mod is None and block_mask is None:
        if mod_args:
            raise ValueError("mod_args given without score_mod, mask_mod or block_mask")
        return {}
    from .mods import BlockMask, as_jit

    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must come from engine.create_block_mask, got {type(block_mask).__name__}")
        block_mask.check_compatible(batch, heads, L, S)
        if mask_mod is not None and as_jit(mask_mod, "mask_mod") is not block_mask.mask_mod:
            raise ValueError("mask_mod differs from the mask_mod block_mask was built with; pass one of them")
        if mod_args and mod_args is not block_mask.mod_args:
            raise ValueError("pass mod_args to create_block_mask, not again with block_mask")
        mask_mod, mod_args = block_mask.mask_mod, block_mask.mod_args
    mod_args = native_mod_args(mod_args)
    for name, mod, fixed in (
        ("score_mod", score_mod, "score, b, h, q_idx, kv_idx"),
        ("mask_mod", mask_mod, "b, h, q_idx, kv_idx"),
    ):
        if mod is not None:
            _check_mod_arity(mod, name, fixed, len(mod_args))
    return {
        "score_mod": None if score_mod is None else as_jit(score_mod, "score_mod"),
        "mask_mod": None if mask_mod is None else as_jit(mask_mod, "mask_mod"),
        "mod_args": mod_args,
        "block_mask": block_mask,
    }


def _check_mod_arity(mod, name: str, fixed: str, n_args: int) -> None:
    """A mod must take its fixed arguments and then one per ``mod_args`` entry: checked here, so a
    wrong signature is a TypeError naming the mod instead of a Numba typing error from the kernel."""
    import inspect

    from .mods import python_function

    try:
        sig = inspect.signature(python_function(mod))
    except (TypeError, ValueError):  # a builtin or a compiled function without a signature
        return
    count = fixed.count(",") + 1 + n_args
    try:
        sig.bind(*range(count))
    except TypeError:
        raise TypeError(
            f"{name} {getattr(mod, '__name__', mod)!r} must take {count} positional arguments ({fixed}, then "
            f"one per mod_args entry: {n_args}), but its signature is {sig}"
        ) from None
