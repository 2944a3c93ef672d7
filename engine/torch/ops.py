"""The engine's attention as torch custom operators (``torch.library.custom_op``), with fake
(meta) implementations and autograd, as FlashAttention registers its kernels: ``torch.compile``
(``fullgraph=True``) and ``torch.export`` see one opaque op per direction.

- ``attention_engine::attention_forward(query, key, value, attn_mask, sinks, mod_tensors,
  dropout_seed, dropout_p, is_causal, causal_offset, scale, enable_gqa, config, needs_grad) ->
  (out, lse)``
- ``attention_engine::attention_backward(grad_out, grad_lse, query, key, value, attn_mask, sinks,
  out, lse, mod_tensors, dropout_seed, ..., config, mask_grad, sinks_grad, mod_grads) -> (dq, dk,
  dv, dmask, dsinks, dmod_tensors)``

``mod_tensors`` are the tensor entries of ``mod_args`` in order; everything else a call needs that
an operator cannot take (the mods, ``block_mask``, numbers among ``mod_args``, the backend's name)
is the :class:`~engine.torch.calls.CallConfig` under the int ``config``. The causal kind is
``is_causal`` plus the diagonal offset (0: top left; S - L: bottom right, from a ``CausalBias``).
``lse`` is float32 for 16-bit inputs (FlashAttention's choice: the backward recomputes the
weights from it), else the inputs' dtype. ``sinks`` (``(Hq,)`` or None) go to the engine, which
applies them around its kernels in both directions (``engine.problems.sinks``); ``lse`` then holds
the sink. A gradient nobody asked for comes back as an empty tensor (operators cannot return
None).

Eager calls on plain tensors run the same two implementations through :class:`_EagerAttention`
(an ``autograd.Function``) instead of the operators' dispatch, which costs about a millisecond of
Python per call; traced calls (``torch.compile``, ``torch.export``, fake or functional tensors)
go through the operators. :func:`attention` chooses.

**Adding an input with a gradient** (as ``sinks``): a ``Tensor?`` argument in both
implementations' signatures (``forward_impl``, ``backward_impl``) and fake functions, passed on to
the engine there and saved in :func:`_setup_context`; ``backward_impl`` returns its gradient as one
more output (an empty tensor when not wanted), :func:`_gradients` passes it on, and
:func:`_backward` and ``_EagerAttention.backward`` return it in the argument's place (one more
positional input of ``_EagerAttention``). **A second operator** (as varlen, ``engine.torch.varlen``)
is a pair of implementations registered with ``custom_op`` like these two, with its own
``register_fake``, ``register_autograd`` and eager Function.
"""

from __future__ import annotations

import dataclasses

import torch

from ..backward import backward_sinks_grad, run_backward
from ..dispatch import select_backend
from ..functional import run_forward
from ..plan.forward import forward_key, remember, run_cached
from ..problems.attention import validate_attention_args
from ..problems.backward import validate_backward_args
from ..problems.causal import LOWER_RIGHT, CausalBias
from .calls import call_config, tensor_slot
from .convert import as_tensor, empty, host

__all__ = ["attention", "attention_forward", "attention_backward", "output_shapes", "lse_dtype", "host_sinks"]

_LIB = "attention_engine"


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the lse the forward operator returns for inputs of ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_shapes(q_shape, k_shape, v_shape, enable_gqa: bool) -> tuple:
    """``(out_shape, lse_shape)`` from the inputs' shapes, with the engine's broadcasting
    (``engine.problems.attention._broadcast_heads``; bad shapes are left to the engine's checks,
    which run with the operator)."""
    L, Ev = q_shape[-2], v_shape[-1]
    rank = max(len(q_shape), len(k_shape), len(v_shape))
    if rank == 2:
        return (L, Ev), (L,)
    qp, kp, vp = ((1,) * (rank - len(s)) + tuple(s) for s in (q_shape, k_shape, v_shape))
    batch = tuple(torch.broadcast_shapes(qp[:-3], kp[:-3], vp[:-3]))
    hq, h = qp[-3], max(kp[-3], vp[-3])
    heads = h if (hq == 1 and h != 1 and not enable_gqa) else hq
    return batch + (heads, L, Ev), batch + (heads, L)


def host_sinks(sinks: torch.Tensor | None):
    """The sinks as the engine's host array (a CUDA tensor's copy: the engine applies sinks to host
    results only and refuses device inputs with sinks by name), or None."""
    return None if sinks is None else host(sinks.detach().cpu())


def _causal(is_causal: bool, causal_offset: int, L: int, S: int):
    """``(attn_mask, is_causal)`` for the engine: a bottom-right ``CausalBias`` for an offset."""
    if not is_causal or causal_offset == 0:
        return None, is_causal
    if causal_offset != S - L:
        raise ValueError(f"causal_offset must be 0 or S - L = {S - L}, got {causal_offset}")
    return CausalBias(LOWER_RIGHT, L, S), False


def _problem_args(query, key, value, attn_mask, mod_tensors, dropout_seed, dropout_p, is_causal, causal_offset, config):
    """The engine's arguments common to both directions, as host arrays where on the CPU."""
    cfg = call_config(config)
    causal_mask, is_causal = _causal(is_causal, causal_offset, query.shape[-2], key.shape[-2])
    mask = causal_mask if attn_mask is None else host(attn_mask)
    seed = None if dropout_seed is None else int(dropout_seed.item())
    mod_args = cfg.mod_args_with([host(t) for t in mod_tensors])
    return cfg, mask, is_causal, mod_args, seed if dropout_p > 0 else None


def forward_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mod_tensors: list[torch.Tensor],
    dropout_seed: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    causal_offset: int,
    scale: float | None,
    enable_gqa: bool,
    config: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, mask, causal, mod_args, seed = _problem_args(
        query, key, value, attn_mask, mod_tensors, dropout_seed, dropout_p, is_causal, causal_offset, config
    )
    q, k, v = host(query), host(key), host(value)
    # a call plan as the NumPy call's (engine.plan.forward), in keys of its own: the problem it
    # rebuilds has this op's flags. Not for sinks or dropout (the full path every call)
    plan_key = None
    if sinks is None and dropout_p == 0:
        plan_key = forward_key(
            q, k, v, mask, causal, enable_gqa, cfg.backend, True, cfg.score_mod, cfg.mask_mod, cfg.block_mask, mod_args
        )
        if plan_key is not None:
            plan_key += (_TORCH_PLANS, needs_grad)
            result = run_cached(plan_key, q, k, v, mask, scale, mod_args, cfg.block_mask, dropout_p, seed)
            if result is not None:
                return _tensors(result, query)
    problem = validate_attention_args(
        q,
        k,
        v,
        mask,
        causal,
        scale,
        enable_gqa,
        True,
        cfg.score_mod,
        cfg.mask_mod,
        cfg.block_mask,
        mod_args,
        dropout_p,
        seed,
        draw_seed=False,
        sinks=host_sinks(sinks),
    )
    # the forward runs where the backward can run too; a 16-bit lse is kept in float32
    problem = dataclasses.replace(problem, needs_backward=needs_grad, lse_float32=True)
    chosen = select_backend(cfg.backend, problem)
    result = run_forward(problem, chosen)
    remember(plan_key, problem, chosen, chosen.op(type(problem)), q, k, v, mask)
    return _tensors(result, query)


#: marks the call plans of this op's forward (``forward_impl``) apart from the NumPy calls'
_TORCH_PLANS = "engine.torch"


def _tensors(result, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's ``(out, lse)`` as the op's contiguous tensors on the query's device."""
    out, lse = result
    return as_tensor(out, query).contiguous(), as_tensor(lse, query).to(lse_dtype(query.dtype)).contiguous()


attention_forward = torch.library.custom_op(f"{_LIB}::attention_forward", mutates_args=())(forward_impl)


@attention_forward.register_fake
def _forward_fake(query, key, value, attn_mask, sinks, mod_tensors, dropout_seed, *options):
    out_shape, lse_shape = output_shapes(query.shape, key.shape, value.shape, options[4])  # enable_gqa
    return query.new_empty(out_shape), query.new_empty(lse_shape, dtype=lse_dtype(query.dtype))


def backward_impl(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    sinks: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    mod_tensors: list[torch.Tensor],
    dropout_seed: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    causal_offset: int,
    scale: float | None,
    enable_gqa: bool,
    config: int,
    mask_grad: bool,
    sinks_grad: bool,
    mod_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    cfg, mask, causal, mod_args, seed = _problem_args(
        query, key, value, attn_mask, mod_tensors, dropout_seed, dropout_p, is_causal, causal_offset, config
    )
    if grad_lse is not None and not bool(grad_lse.any()):  # lse returned but not used by the loss
        grad_lse = None
    marks = _marks(cfg, mod_grads)
    problem = validate_backward_args(
        host(grad_out),
        host(query),
        host(key),
        host(value),
        host(out),
        host(lse),
        mask,
        causal,
        scale,
        enable_gqa,
        cfg.score_mod,
        cfg.mask_mod,
        cfg.block_mask,
        mod_args,
        dropout_p,
        seed,
        mask_grad,
        None if grad_lse is None else host(grad_lse),
        marks if any(marks) else False,
        sinks=host_sinks(sinks),
    )
    grads = run_backward(problem, select_backend(cfg.backend, problem))
    dq, dk, dv = (
        _sum_to(as_tensor(g, t), t).contiguous() for g, t in zip((grads.dq, grads.dk, grads.dv), (query, key, value))
    )
    dmask = empty(query) if not mask_grad else as_tensor(grads.dmask, attn_mask).contiguous()
    dsinks = empty(query) if not sinks_grad else as_tensor(backward_sinks_grad(problem), sinks).contiguous()
    dmods = []
    tensor_positions = [i for i, a in enumerate(cfg.mod_args) if tensor_slot(a)]
    for t, want, pos in zip(mod_tensors, mod_grads, tensor_positions):
        g = grads.dmod_args[pos] if want and grads.dmod_args is not None else None
        dmods.append(empty(t) if g is None else as_tensor(g, t).contiguous())
    return dq, dk, dv, dmask, dsinks, dmods


attention_backward = torch.library.custom_op(f"{_LIB}::attention_backward", mutates_args=())(backward_impl)


def _marks(cfg, mod_grads) -> tuple:
    """One bool per ``mod_args`` entry: True for the tensor entries whose gradient is wanted."""
    it = iter(mod_grads)
    return tuple(bool(next(it)) if tensor_slot(a) else False for a in cfg.mod_args)


def _sum_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient of a broadcast input summed back to the input's shape."""
    return g if g.shape == like.shape else g.sum_to_size(like.shape)


@attention_backward.register_fake
def _backward_fake(grad_out, grad_lse, query, key, value, attn_mask, sinks, out, lse, mod_tensors, *rest):
    mask_grad, sinks_grad, mod_grads = rest[-3:]
    # contiguous, as the real gradients (empty_like would keep a permuted input's strides)
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else query.new_empty((0,))
    dsinks = sinks.new_empty(sinks.shape) if sinks_grad else query.new_empty((0,))
    dmods = [t.new_empty(t.shape if want else (0,)) for t, want in zip(mod_tensors, mod_grads)]
    q_grad, k_grad, v_grad = (t.new_empty(t.shape) for t in (query, key, value))
    return q_grad, k_grad, v_grad, dmask, dsinks, dmods


# -- autograd -------------------------------------------------------------------------------------

_OPTIONS = ("dropout_p", "is_causal", "causal_offset", "scale", "enable_gqa", "config")


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, sinks, mod_tensors, dropout_seed, *options, _needs_grad = inputs
    out, lse = output
    ctx.options = dict(zip(_OPTIONS, options))
    ctx.mask_grad = attn_mask is not None and attn_mask.requires_grad and attn_mask.is_floating_point()
    ctx.sinks_grad = sinks is not None and sinks.requires_grad
    ctx.mod_grads = [bool(t.requires_grad) for t in mod_tensors]
    ctx.has_mask, ctx.has_seed, ctx.n_mods = attn_mask is not None, dropout_seed is not None, len(mod_tensors)
    ctx.has_sinks = sinks is not None
    ctx.save_for_backward(
        query,
        key,
        value,
        out,
        lse,
        *(() if attn_mask is None else (attn_mask,)),
        *(() if sinks is None else (sinks,)),
        *(() if dropout_seed is None else (dropout_seed,)),
        *mod_tensors,
    )


def _gradients(ctx, grad_out, grad_lse, run):
    """``(dq, dk, dv)`` (None where not needed), dmask and dsinks (or None) and the mod tensors'
    gradients (None where not wanted), computed by ``run``: the backward operator, or its
    implementation."""
    # create_graph=True runs the backward with grad mode on: a second derivative is asked for,
    # which this op cannot give (a gradient penalty would otherwise lose its term silently)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "engine.torch.scaled_dot_product_attention is not twice differentiable: its backward "
            "cannot build a graph (create_graph=True, e.g. a gradient penalty)"
        )
    saved = list(ctx.saved_tensors)
    query, key, value, out, lse = saved[:5]
    rest = saved[5:]
    attn_mask = rest.pop(0) if ctx.has_mask else None
    sinks = rest.pop(0) if ctx.has_sinks else None
    dropout_seed = rest.pop(0) if ctx.has_seed else None
    mod_tensors = rest
    o = ctx.options
    if grad_out is None:  # only lse reached the loss
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dmask, dsinks, dmods = run(
        grad_out.contiguous(),
        None if grad_lse is None else grad_lse.contiguous(),
        query,
        key,
        value,
        attn_mask,
        sinks,
        out,
        lse,
        mod_tensors,
        dropout_seed,
        o["dropout_p"],
        o["is_causal"],
        o["causal_offset"],
        o["scale"],
        o["enable_gqa"],
        o["config"],
        ctx.mask_grad,
        ctx.sinks_grad,
        ctx.mod_grads,
    )
    needs = ctx.needs_input_grad
    grads = [g if n else None for g, n in zip((dq, dk, dv), needs[:3])]
    mods = [g if want else None for g, want in zip(dmods, ctx.mod_grads)]
    return grads, dmask if ctx.mask_grad else None, dsinks if ctx.sinks_grad else None, mods


def _backward(ctx, grad_out, grad_lse):
    grads, dmask, dsinks, mods = _gradients(ctx, grad_out, grad_lse, attention_backward)
    return (*grads, dmask, dsinks, mods) + (None,) * 8  # dropout_seed ... needs_grad take none


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same implementations without the operators' dispatch, for eager calls on plain tensors
    (the custom operators' Python dispatch costs about a millisecond per call): the mod tensors
    are positional here, since autograd.Function sees no tensor inside a list."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, sinks, dropout_seed, options, *mod_tensors):
        inputs = (query, key, value, attn_mask, sinks, list(mod_tensors), dropout_seed, *options)
        output = forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        grads, dmask, dsinks, mods = _gradients(ctx, grad_out, grad_lse, backward_impl)
        return (*grads, dmask, dsinks, None, None, *mods)


def attention(query, key, value, attn_mask, sinks, mod_tensors, dropout_seed, *options):
    """``(out, lse)`` with autograd: through the custom operator when traced (``torch.compile``,
    ``torch.export``, fake or functional tensors), else through :class:`_EagerAttention`, which
    runs the same code. ``options`` are the operator's arguments after ``dropout_seed``."""
    tensors = (query, key, value, *mod_tensors, *(t for t in (attn_mask, sinks) if t is not None))
    if torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in tensors):
        return attention_forward(query, key, value, attn_mask, sinks, mod_tensors, dropout_seed, *options)
    return _EagerAttention.apply(query, key, value, attn_mask, sinks, dropout_seed, options, *mod_tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
