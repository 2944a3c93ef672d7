"""``engine.torch.as_module``: a variant as a ``torch.nn.Module`` whose parameters are the
variant's (torch's names, so ``state_dict()`` round-trips with ``nn.MultiheadAttention``), with the
projections computed by torch and the attention by the engine's custom operator, so gradients
reach every parameter and ``torch.compile`` sees the attention as one op."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..problems.arrays import Placement, input_placement
from ..variant import variant_dtype
from .convert import as_tensor
from .functional import scaled_dot_product_attention

__all__ = ["as_module", "VariantModule"]

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
            # as_tensor: a bfloat16 variant's ml_dtypes array becomes a torch bfloat16 tensor
            owner.register_parameter(leaf, torch.nn.Parameter(as_tensor(np.array(value), torch.empty(0))))
        self._variant = _bind(copy.copy(variant), self)
        self._follow_dtype()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._follow_dtype()  # module.double(), .to(dtype): the variant computes in the new dtype
        return result

    def _follow_dtype(self):
        """The variant's dtype follows its parameters' (set here, outside ``forward``, so that a
        compiled forward has no NumPy object to write)."""
        first = next(self.parameters(), None)
        if first is not None and hasattr(self, "_variant"):
            self._variant.dtype = variant_dtype(first.dtype)

    def forward(self, query, key=None, value=None, **kwargs):
        bound = self._variant
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
        variant._attention_calls += 1  # return_lse (add_bias_kv, add_zero_attn) has its gradient
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
