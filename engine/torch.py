"""``engine.torch``: the engine's attention inside torch autograd (an optional extra: torch).

``import engine`` never imports torch; this module does.

- :func:`scaled_dot_product_attention` has the signature of
  ``torch.nn.functional.scaled_dot_product_attention`` plus the engine's keywords, and is a
  ``torch.autograd.Function``: its forward is the engine's forward, its backward the engine's
  backward (``engine.scaled_dot_product_attention_backward``). CPU tensors are read and results
  returned without copies (NumPy views of the same memory). CUDA tensors are read in place by the
  ``cuda`` backend (forward and backward), on ``torch.cuda.current_stream()`` (in the backward,
  the stream autograd runs it on: the forward's), and the results and gradients are torch CUDA
  tensors on the inputs' device.
- :func:`as_module` turns a variant into a ``torch.nn.Module`` whose parameters are the variant's
  (torch's names, so ``state_dict()`` round-trips with ``nn.MultiheadAttention``), with the
  projections computed by torch and the attention by the engine, so gradients reach every
  parameter.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch

from .backward import run_backward
from .dispatch import select_backend
from .functional import run_forward
from .problems.arrays import Placement, bfloat16_dtype, input_placement
from .problems.attention import validate_attention_args
from .problems.backward import validate_backward_args
from .problems.base import check_bool
from .problems.causal import CausalBias, as_causal_bias
from .runtime.errors import NotSupportedError
from .variant import variant_dtype

__all__ = ["scaled_dot_product_attention", "as_module", "VariantModule"]


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
    mod_args=(),
    backend="auto",
):
    """``torch.nn.functional.scaled_dot_product_attention`` computed by the engine, differentiable.

    Arguments as torch's: tensors ``(..., Hq, L, E)``, ``(..., H, S, E)``, ``(..., H, S, Ev)``,
    ``attn_mask`` boolean (True = may attend) or floating (added; it gets a gradient when it
    requires one), ``dropout_p`` applied whenever > 0 (as torch's functional; pass 0 in
    evaluation), ``is_causal`` top-left, ``scale``, ``enable_gqa``. The engine's keywords
    ``score_mod``, ``mask_mod``, ``block_mask``, ``mod_args`` and ``backend`` are those of
    ``engine.scaled_dot_product_attention``; a score_mod's derivative is its declared one or
    found automatically (see ``docs/training.md``). ``mod_args`` get no gradient: a tensor among
    them that requires one is an error.

    The dropout seed is drawn from torch's default generator (``torch.manual_seed`` repeats it)
    and handed to the backward, which regenerates the same dropped weights.

    :param query: ``(..., Hq, L, E)``, CPU or CUDA, float16, bfloat16, float32 or float64.
    :type query: torch.Tensor
    :param key: ``(..., H, S, E)``, the query's dtype and device.
    :type key: torch.Tensor
    :param value: ``(..., H, S, Ev)``, the query's dtype and device.
    :type value: torch.Tensor
    :param attn_mask: boolean (True = may attend) or floating (added; it gets a gradient when it
        requires one), broadcastable to ``(..., Hq, L, S)``; or a causal mask object (torch's
        ``causal_lower_right``/``causal_upper_left``, ``engine.causal_lower_right``), mapped to the
        engine's causal kinds.
    :type attn_mask: torch.Tensor | CausalBias | None
    :param dropout_p: applied whenever > 0, as torch's functional (pass 0 in evaluation).
    :type dropout_p: float
    :param is_causal: top-left causal, as torch.
    :type is_causal: bool
    :param scale: None is ``1/sqrt(E)``.
    :type scale: float | None
    :param enable_gqa: grouped-query attention, as torch.
    :type enable_gqa: bool
    :param score_mod: as ``engine.scaled_dot_product_attention``'s; its derivative is declared or
        found automatically.
    :type score_mod: Callable | None
    :param mask_mod: as ``engine.scaled_dot_product_attention``'s.
    :type mask_mod: Callable | None
    :param block_mask: as ``engine.scaled_dot_product_attention``'s.
    :type block_mask: BlockMask | None
    :param mod_args: the mods' extra arguments; a tensor among them must not require grad.
    :type mod_args: tuple
    :param backend: ``"auto"`` or a backend name.
    :type backend: str
    :return: a tensor ``(..., Hq, L, Ev)`` of the inputs' dtype, on their device.
    :raises TypeError: an argument of the wrong kind, as the engine's forward, before anything runs.
    :raises ValueError: bad shapes or values, as the engine's forward, before anything runs.
    :raises engine.NotSupportedError: a gradient is needed and no backend with a backward pass can
        run the inputs (e.g. float64 CUDA tensors, which the ``cuda`` backend does not take).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_real_data(t, name)
    attn_mask, is_causal = _mask_argument(attn_mask, is_causal)
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    for i, a in enumerate(mod_args):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            raise ValueError(
                f"mod_args[{i}] requires grad, but gradients with respect to mod_args are "
                "not computed; pass it detached (a learned bias can be a float attn_mask, "
                "which gets its gradient)"
            )
    mod_args = tuple(_host(a) if isinstance(a, torch.Tensor) else a for a in mod_args)
    inputs = (query, key, value) + (() if attn_mask is None else (attn_mask,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    seed = None
    if dropout_p and dropout_p > 0:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())
    options = dict(
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        score_mod=score_mod,
        mask_mod=mask_mod,
        block_mask=block_mask,
        mod_args=mod_args,
        dropout_seed=seed,
        backend=backend,
        needs_grad=needs_grad,
    )
    return _Attention.apply(query, key, value, attn_mask, options)


class _Attention(torch.autograd.Function):
    """The engine's forward and backward as one autograd node (not twice differentiable)."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, options):
        opts = dict(options)
        backend, needs_grad = opts.pop("backend"), opts.pop("needs_grad")
        problem = validate_attention_args(
            _host(query),
            _host(key),
            _host(value),
            *_engine_mask(attn_mask, opts["is_causal"]),
            opts["scale"],
            opts["enable_gqa"],
            True,
            opts["score_mod"],
            opts["mask_mod"],
            opts["block_mask"],
            opts["mod_args"],
            opts["dropout_p"],
            opts["dropout_seed"],
            draw_seed=False,
        )
        if needs_grad:  # the forward runs where the backward can run too
            problem = replace(problem, needs_backward=True)
        chosen = select_backend(backend, problem)
        out, lse = run_forward(problem, chosen)
        out_t, lse_t = _as_tensor(out, query), _as_tensor(lse, query)
        ctx.save_for_backward(query, key, value, attn_mask, out_t, lse_t)
        ctx.options = opts
        ctx.backend = chosen.name
        return out_t

    @staticmethod
    def backward(ctx, grad_out):
        # create_graph=True runs the backward with grad mode on: a second derivative is asked for,
        # which this node cannot give (torch's once_differentiable only notices when grad_out
        # itself requires grad, so a gradient penalty would silently lose its term)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "engine.torch.scaled_dot_product_attention is not twice differentiable: its backward "
                "cannot build a graph (create_graph=True, e.g. a gradient penalty)"
            )
        return _Attention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        o = ctx.options
        mask_grad = attn_mask is not None and ctx.needs_input_grad[3] and attn_mask.dtype.is_floating_point
        problem = validate_backward_args(
            _host(grad_out),
            _host(query),
            _host(key),
            _host(value),
            _host(out),
            _host(lse),
            *_engine_mask(attn_mask, o["is_causal"]),
            o["scale"],
            o["enable_gqa"],
            o["score_mod"],
            o["mask_mod"],
            o["block_mask"],
            o["mod_args"],
            o["dropout_p"],
            o["dropout_seed"],
            mask_grad,
        )
        dq, dk, dv, dmask = run_backward(problem, select_backend(ctx.backend, problem))
        grads = [
            _as_tensor(g, t) if need else None
            for g, t, need in zip((dq, dk, dv), (query, key, value), ctx.needs_input_grad[:3])
        ]
        return (*grads, None if dmask is None else _as_tensor(dmask, attn_mask), None)


def _mask_argument(attn_mask, is_causal):
    """``(attn_mask, is_causal)`` for the autograd Function: a causal mask object (torch's
    ``causal_lower_right``/``causal_upper_left``, a tensor subclass whose storage is a placeholder,
    or ``engine.causal_lower_right``) becomes ``(None, engine CausalBias)``, never read as data;
    arrays become tensors; a tensor subclass without real data is refused by name."""
    bias = as_causal_bias(attn_mask)
    if bias is not None:
        if check_bool(is_causal, "is_causal"):
            raise ValueError("pass either attn_mask or is_causal=True, not both (as torch)")
        return None, bias
    if attn_mask is None:
        return None, is_causal
    if not isinstance(attn_mask, torch.Tensor):
        return torch.as_tensor(np.asarray(attn_mask)), is_causal
    _check_real_data(attn_mask, "attn_mask")
    return attn_mask, is_causal


def _engine_mask(attn_mask, is_causal) -> tuple:
    """``(attn_mask, is_causal)`` as the engine's validation takes them: the causal mask object
    itself (the engine maps it to its causal kinds), or the tensor's host view and the flag."""
    if isinstance(is_causal, CausalBias):
        return is_causal, False
    return (None if attn_mask is None else _host(attn_mask)), is_causal


def _check_real_data(t: torch.Tensor, name: str) -> None:
    """``TypeError`` naming ``name`` for a tensor subclass whose data is not in its own storage (a
    wrapper subclass, e.g. DTensor or a fake tensor): its bytes are not its values."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    wrapper = is_traceable_wrapper_subclass(t)
    if not wrapper:
        try:
            t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            wrapper = True
    if wrapper:
        raise TypeError(
            f"{name} is a {type(t).__module__}.{type(t).__name__}, a tensor subclass whose data is not in "
            "its own storage; engine.torch reads tensors' memory: pass a plain tensor (e.g. its "
            "materialised values), or torch's causal_lower_right/causal_upper_left as attn_mask"
        )


def _host(t):
    """A NumPy view of a CPU tensor (bfloat16 as ml_dtypes' bfloat16, same bits), or the detached
    tensor itself for CUDA tensors (read through ``__cuda_array_interface__``)."""
    t = t.detach()
    if t.device.type != "cpu":
        return t
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(bfloat16_dtype())
    return t.numpy()


def _as_tensor(arr, like: torch.Tensor) -> torch.Tensor:
    """An engine result as a tensor on ``like``'s device (no copy for NumPy results)."""
    if isinstance(arr, torch.Tensor):
        return arr
    if isinstance(arr, np.ndarray):
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.uint16)).view(torch.bfloat16).to(like.device)
        return torch.from_numpy(arr).to(like.device)
    return torch.as_tensor(arr, device=like.device)  # a device array (__cuda_array_interface__)


# -- variants as modules --------------------------------------------------------------------------

_TORCH_CPU = None


def _torch_placement() -> Placement:
    global _TORCH_CPU
    if _TORCH_CPU is None:
        import array_api_compat

        _TORCH_CPU = Placement(array_api_compat.array_namespace(torch.empty(0)), torch.device("cpu"))
    return _TORCH_CPU


class VariantModule(torch.nn.Module):
    """A variant as a ``torch.nn.Module`` (see :func:`as_module`).

    ``forward(query, key=None, value=None, **kwargs)`` takes what the variant's call takes (torch
    CPU tensors ``(N, L, E)`` or ``(L, E)``, its masks and keywords) and returns
    ``(output, weights_or_None)`` as tensors; ``output`` carries gradients to the inputs and the
    parameters (``weights``, when asked for, are computed without gradients).

    :param variant: the variant to wrap (see :func:`as_module`).
    :type variant: Variant
    """

    def __init__(self, variant):
        super().__init__()
        if not getattr(variant, "device_arrays", False):
            raise TypeError(
                f"variant {variant.name!r} ({type(variant).__name__}) computes in NumPy "
                "(device_arrays = False), so torch cannot follow its projections; as_module wraps "
                "variants whose forward uses array-API calls, self.param(key, like=x) and "
                "self.attention(...), as the built-in ones do"
            )
        self.variant_name = variant.name
        for key, value in variant.state_dict().items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            # _as_tensor: a bfloat16 variant's ml_dtypes array becomes a torch bfloat16 tensor
            owner.register_parameter(leaf, torch.nn.Parameter(_as_tensor(np.array(value), torch.empty(0))))
        self._variant = _bind(copy.copy(variant), self)

    def forward(self, query, key=None, value=None, **kwargs):
        bound = self._variant
        bound.dtype = variant_dtype(next(self.parameters()).dtype)
        bound._attention_calls = 0
        try:
            result = bound(query, key, value, **kwargs)
        except TypeError as exc:
            if bound._attention_calls == 0 and "requires grad" in str(exc):
                raise TypeError(
                    f"variant {self.variant_name!r} attends without self.attention(...), so "
                    f"its attention cannot run inside torch autograd: {exc}"
                ) from None
            raise
        if bound._attention_calls == 0:
            raise TypeError(
                f"variant {self.variant_name!r} did not attend through self.attention(...): "
                "as_module cannot route its attention through torch autograd"
            )
        return result

    def extra_repr(self) -> str:
        return f"variant={self.variant_name!r}"


def _bind(variant, module: VariantModule):
    """Rebind a copy of ``variant``'s hooks: inputs stay torch tensors, parameters are the
    module's, attention goes through :func:`scaled_dot_product_attention`."""
    place = _torch_placement()

    def placement(x, name):
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise TypeError(
                    f"{name} is a {x.device.type} tensor; as_module computes on CPU tensors "
                    "(its parameters live on the CPU); engine.torch.scaled_dot_product_attention "
                    "takes CUDA tensors"
                )
            return place
        return input_placement(x, name)

    def param(key, like=None):
        value = module  # attribute lookups, so torch.func.functional_call's substitutes are seen
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def attention(query, key, value, *, attn_mask=None, is_causal=False, backend="auto", **kwargs):
        variant._attention_calls += 1
        if kwargs.pop("return_lse", False):  # add_bias_kv / add_zero_attn merge through the lse
            raise NotSupportedError(
                f"variant {variant.name!r} asked for the log-sum-exp (add_bias_kv or add_zero_attn), "
                "whose gradient engine.torch does not compute yet; train it without those options"
            )
        return scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, backend=backend, **kwargs
        )

    variant.input_placement = placement
    variant.param = param
    variant.attention = attention
    variant._attention_calls = 0
    return variant


def as_module(variant) -> VariantModule:
    """A ``torch.nn.Module`` running ``variant`` with its parameters as ``nn.Parameter``s.

    The parameters start as copies of the variant's and keep its names (``in_proj_weight``,
    ``out_proj.weight``...), so ``state_dict()``/``load_state_dict()`` round-trip with
    ``torch.nn.MultiheadAttention`` for the variants that mirror it; ``variant.load_state_dict(
    module.state_dict())`` copies trained values back. The module computes the projections with
    torch and the attention with the engine (``backend="auto"``, or the call's ``backend=``).

    :param variant: a variant whose forward uses array-API calls (``device_arrays = True``), as the
        built-in ones.
    :type variant: Variant
    :raises TypeError: for a variant whose forward computes in NumPy (``device_arrays = False``),
        and, at the first call, for one that does not attend through ``Variant.attention``.
    """
    return VariantModule(variant)
