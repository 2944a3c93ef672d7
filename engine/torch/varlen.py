"""``engine.torch.varlen_attention``: packed variable-length attention (``engine.varlen_attention``)
inside torch autograd, as a second pair of custom operators beside ``engine.torch.ops``'s.

- ``attention_engine::varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, sinks,
  mod_tensors, is_causal, window_left, window_right, scale, config) -> (out, lse)``
- ``attention_engine::varlen_backward(grad_out, grad_lse, query, key, value, out, lse,
  cu_seqlens_q, cu_seqlens_k, sinks, mod_tensors, is_causal, window_left, window_right, scale,
  config, sinks_grad) -> (dq, dk, dv, dsinks)``

Each runs the engine's public function (``engine.varlen_attention`` and
``engine.varlen_attention_backward``) on NumPy views of the CPU tensors. ``lse`` is
``(total_q, Hq)`` in the inputs' dtype; the sinks' gradient is an empty tensor when not wanted.
Eager calls on plain tensors take :class:`_EagerVarlen` (the same implementations without the
operators' dispatch, as ``engine.torch.ops`` does); traced calls take the operators.
"""

from __future__ import annotations

import numpy as np
import torch

from ..problems.arrays import refuse_masked_array
from ..problems.base import check_bool, check_scale
from ..problems.decode import _window as window_arg
from ..runtime.errors import NotSupportedError
from ..varlen import varlen_attention as _varlen_forward
from ..varlen import varlen_attention_backward as _varlen_backward
from .calls import call_config, config_key, split_mod_args
from .convert import as_tensor, check_real_data, empty, host
from .ops import host_sinks

__all__ = ["varlen_attention", "varlen_forward", "varlen_backward"]

_LIB = "attention_engine"


def _engine_args(query, key, value, cu_seqlens_q, cu_seqlens_k, sinks, mod_tensors, config):
    """The engine's positional arrays and the keywords both directions share."""
    cfg = call_config(config)
    arrays = (host(query), host(key), host(value), host(cu_seqlens_q), host(cu_seqlens_k))
    keywords = dict(
        sinks=host_sinks(sinks),
        score_mod=cfg.score_mod,
        mask_mod=cfg.mask_mod,
        mod_args=cfg.mod_args_with([host(t) for t in mod_tensors]),
        backend=cfg.backend,
    )
    return arrays, keywords


def forward_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    sinks: torch.Tensor | None,
    mod_tensors: list[torch.Tensor],
    is_causal: bool,
    window_left: int,
    window_right: int,
    scale: float | None,
    config: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    arrays, keywords = _engine_args(query, key, value, cu_seqlens_q, cu_seqlens_k, sinks, mod_tensors, config)
    out, lse = _varlen_forward(
        *arrays, is_causal=is_causal, scale=scale, window=(window_left, window_right), return_lse=True, **keywords
    )
    return as_tensor(out, query).contiguous(), as_tensor(lse, query).contiguous()


varlen_forward = torch.library.custom_op(f"{_LIB}::varlen_forward", mutates_args=())(forward_impl)


@varlen_forward.register_fake
def _forward_fake(query, key, value, *rest):
    return query.new_empty((query.shape[0], query.shape[1], value.shape[2])), query.new_empty(query.shape[:2])


def backward_impl(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    sinks: torch.Tensor | None,
    mod_tensors: list[torch.Tensor],
    is_causal: bool,
    window_left: int,
    window_right: int,
    scale: float | None,
    config: int,
    sinks_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    arrays, keywords = _engine_args(query, key, value, cu_seqlens_q, cu_seqlens_k, sinks, mod_tensors, config)
    if grad_lse is not None and not bool(grad_lse.any()):  # lse returned but not used by the loss
        grad_lse = None
    grads = _varlen_backward(
        host(grad_out),
        *arrays[:3],
        host(out),
        host(lse),
        *arrays[3:],
        is_causal=is_causal,
        scale=scale,
        window=(window_left, window_right),
        grad_lse=None if grad_lse is None else host(grad_lse),
        return_sinks_grad=sinks_grad,
        **keywords,
    )
    dq, dk, dv = (as_tensor(g, t).contiguous() for g, t in zip(grads[:3], (query, key, value)))
    dsinks = as_tensor(grads[3], sinks).contiguous() if sinks_grad else empty(query)
    return dq, dk, dv, dsinks


varlen_backward = torch.library.custom_op(f"{_LIB}::varlen_backward", mutates_args=())(backward_impl)


@varlen_backward.register_fake
def _backward_fake(grad_out, grad_lse, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, *rest):
    dsinks = sinks.new_empty(sinks.shape) if rest[-1] else query.new_empty((0,))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dsinks


# -- autograd -------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    query, key, value, cu_q, cu_k, sinks, mod_tensors, *options = inputs
    ctx.options = options  # is_causal, window_left, window_right, scale, config
    ctx.sinks_grad = sinks is not None and sinks.requires_grad
    ctx.has_sinks, ctx.n_mods = sinks is not None, len(mod_tensors)
    ctx.save_for_backward(query, key, value, *output, cu_q, cu_k, *(() if sinks is None else (sinks,)), *mod_tensors)


def _gradients(ctx, grad_out, grad_lse, run):
    """``(dq, dk, dv, dsinks)``, None where not needed, computed by ``run``: the backward operator
    or its implementation."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "engine.torch.varlen_attention is not twice differentiable: its backward cannot build a "
            "graph (create_graph=True, e.g. a gradient penalty)"
        )
    query, key, value, out, lse, cu_q, cu_k, *rest = ctx.saved_tensors
    sinks = rest.pop(0) if ctx.has_sinks else None
    if grad_out is None:  # only lse reached the loss
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dsinks = run(
        grad_out.contiguous(),
        None if grad_lse is None else grad_lse.contiguous(),
        query,
        key,
        value,
        out,
        lse,
        cu_q,
        cu_k,
        sinks,
        rest,
        *ctx.options,
        ctx.sinks_grad,
    )
    grads = [g if n else None for g, n in zip((dq, dk, dv), ctx.needs_input_grad[:3])]
    return (*grads, dsinks if ctx.sinks_grad else None)


def _backward(ctx, grad_out, grad_lse):
    dq, dk, dv, dsinks = _gradients(ctx, grad_out, grad_lse, varlen_backward)
    return (dq, dk, dv, None, None, dsinks, [None] * ctx.n_mods) + (None,) * 5  # is_causal ... config


varlen_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerVarlen(torch.autograd.Function):
    """The same implementations without the operators' dispatch, for eager calls on plain tensors
    (mod tensors positional: autograd.Function sees no tensor inside a list)."""

    @staticmethod
    def forward(ctx, query, key, value, cu_q, cu_k, sinks, options, *mod_tensors):
        inputs = (query, key, value, cu_q, cu_k, sinks, list(mod_tensors), *options)
        output = forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        dq, dk, dv, dsinks = _gradients(ctx, grad_out, grad_lse, backward_impl)
        return (dq, dk, dv, None, None, dsinks, None) + (None,) * ctx.n_mods


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _as_offsets(x, name: str) -> torch.Tensor:
    """``cu_seqlens`` as a CPU tensor (lists and NumPy arrays converted; the engine checks them)."""
    if x is None:
        raise TypeError(f"{name} must be an integer tensor of shape (B + 1,), got None")
    if not isinstance(x, torch.Tensor):
        refuse_masked_array(x, name)
        x = torch.as_tensor(np.asarray(x))
    return x


def varlen_attention(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    is_causal=False,
    scale=None,
    window=None,
    sinks=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    return_lse=False,
    backend="auto",
):
    """``engine.varlen_attention`` on torch tensors, differentiable (FlashAttention's
    ``flash_attn_varlen_func`` layout and conventions).

    The forward is the engine's ``varlen_attention`` and the backward its
    ``varlen_attention_backward`` (gradients of query, key, value and the sinks; through ``lse``
    too when the loss uses it), registered as the custom operators
    ``attention_engine::varlen_forward``/``varlen_backward`` so that ``torch.compile(fullgraph=True)``
    and ``torch.export`` see one op per direction. CPU tensors only: they are read in place
    (NumPy views). Not twice differentiable.

    :param query: ``(total_q, Hq, E)``, CPU, float32 or float64 (float16/bfloat16 run forward
        only on ``cpu``, whose varlen backward takes float32/float64).
    :type query: torch.Tensor
    :param key: ``(total_k, H, E)``, the query's dtype; H divides Hq (grouped-query attention).
    :type key: torch.Tensor
    :param value: ``(total_k, H, Ev)``, the query's dtype.
    :type value: torch.Tensor
    :param cu_seqlens_q: integer (int32 as FlashAttention's) ``(B + 1,)`` cumulative offsets of the
        query rows, on the CPU (a tensor, a NumPy array or a list); sequence b owns rows
        ``cu_seqlens_q[b] ... cu_seqlens_q[b+1] - 1``.
    :type cu_seqlens_q: torch.Tensor
    :param cu_seqlens_k: the same for the key rows.
    :type cu_seqlens_k: torch.Tensor
    :param is_causal: causal, aligned at the **bottom right** of each sequence (FlashAttention's
        varlen convention: query row i of sequence b is position ``i + len_k[b] - len_q[b]``).
    :type is_causal: bool
    :param scale: None is ``1/sqrt(E)``.
    :type scale: float | None
    :param window: ``(left, right)``, FlashAttention's ``window_size`` (-1 or None: unbounded).
    :type window: tuple[int | None, int | None] | None
    :param sinks: float ``(Hq,)`` attention sinks on the CPU (gpt-oss), in the units of the scaled
        scores; they get their gradient when they require one.
    :type sinks: torch.Tensor | None
    :param score_mod: as ``engine.varlen_attention``'s (positions within the sequence, ``b`` the
        sequence); its derivative is declared or found automatically.
    :type score_mod: Callable | None
    :param mask_mod: as ``engine.varlen_attention``'s.
    :type mask_mod: Callable | None
    :param mod_args: the mods' extra arguments: tensors, NumPy arrays and numbers (constants of a
        ``torch.compile`` graph); none of them gets a gradient.
    :type mod_args: tuple
    :param return_lse: also return ``lse`` ``(total_q, Hq)`` (the inputs' dtype; with sinks, it
        includes them), through which a loss may differentiate too.
    :type return_lse: bool
    :param backend: ``"auto"`` or a backend with a varlen op (``cpu``, ``reference``).
    :type backend: str
    :return: ``out`` ``(total_q, Hq, Ev)`` in the inputs' dtype, or ``(out, lse)``.
    :raises TypeError: an argument of the wrong kind (as ``engine.varlen_attention``), naming it; a
        tensor subclass whose data is not in its own storage.
    :raises ValueError: bad shapes or values, as ``engine.varlen_attention``; a tensor among
        ``mod_args`` that requires grad (the varlen backward computes no ``mod_args`` gradient).
    :raises engine.NotSupportedError: a CUDA tensor (the ``cuda`` backend has no varlen op), named;
        a gradient is needed and the backend has no varlen backward for the inputs (16-bit on
        ``cpu``).
    """
    for name, t in (("query", query), ("key", key), ("value", value), ("sinks", sinks)):
        if t is None and name == "sinks":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_real_data(t, name)
        if t.device.type != "cpu":
            raise NotSupportedError(
                f"engine.torch.varlen_attention runs on CPU tensors: {name} is on {t.device}, and the "
                "cuda backend has no varlen op (pad the batch and use scaled_dot_product_attention)"
            )
    cu_q, cu_k = _as_offsets(cu_seqlens_q, "cu_seqlens_q"), _as_offsets(cu_seqlens_k, "cu_seqlens_k")
    is_causal = check_bool(is_causal, "is_causal")
    return_lse = check_bool(return_lse, "return_lse")
    left, right = window_arg(window)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    tensors, positions, statics = split_mod_args(mod_args)
    for pos, t in zip(positions, tensors):
        if t.requires_grad:
            raise ValueError(
                f"mod_args[{pos}] requires grad, but varlen_attention's backward computes no mod_args "
                "gradient: detach it, or use engine.torch.scaled_dot_product_attention on a padded batch"
            )
    config = config_key(score_mod, mask_mod, None, positions, statics, backend)
    options = (is_causal, left, right, None if scale is None else check_scale(scale, query.shape[-1], ""), config)
    plain = (query, key, value, cu_q, cu_k, *tensors, *(() if sinks is None else (sinks,)))
    if torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in plain):
        out, lse = varlen_forward(query, key, value, cu_q, cu_k, sinks, tensors, *options)
    else:
        out, lse = _EagerVarlen.apply(query, key, value, cu_q, cu_k, sinks, options, *tensors)
    return (out, lse) if return_lse else out
