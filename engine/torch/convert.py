"""Tensors to the engine's arrays and back, without copies on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from ..problems.arrays import bfloat16_dtype

__all__ = ["host", "as_tensor", "empty", "from_numpy", "check_real_data"]


def host(t: torch.Tensor):
    """A NumPy view of a CPU tensor (bfloat16 as ml_dtypes' bfloat16, same bits), or the detached
    tensor itself for CUDA tensors (read through ``__cuda_array_interface__``)."""
    t = t.detach()
    if t.device.type != "cpu":
        return t
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(bfloat16_dtype())
    return t.numpy()


def as_tensor(arr, like: torch.Tensor) -> torch.Tensor:
    """An engine result as a tensor on ``like``'s device (no copy for NumPy results)."""
    if isinstance(arr, torch.Tensor):
        return arr
    if isinstance(arr, np.ndarray):
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16).to(like.device)
        return torch.from_numpy(arr).to(like.device)
    return torch.as_tensor(arr, device=like.device)  # a device array (__cuda_array_interface__)


def empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a custom op returns for a gradient nobody asked for (ops cannot return None)."""
    return like.new_empty((0,))


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A NumPy array as a tensor: a view where torch can make one (writeable, no negative strides),
    else a copy (``torch.from_numpy`` warns on read-only arrays and refuses negative strides)."""
    viewable = a.flags.writeable and all(st >= 0 for st in a.strides)
    return torch.from_numpy(a if viewable else np.array(a))


def check_real_data(t: torch.Tensor, name: str) -> None:
    """``TypeError`` naming ``name`` for a tensor subclass whose data is not in its own storage (a
    wrapper subclass, e.g. DTensor or a fake tensor): its bytes are not its values. Plain tensors,
    parameters and tensors seen while tracing (``torch.compile``) pass."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or torch.compiler.is_compiling():
        return
    if type(t).__name__ == "CausalBias":  # torch's causal mask: a placeholder storage, no values
        raise TypeError(
            f"{name} is a causal mask object ({type(t).__module__}.CausalBias), not a tensor of values: "
            "pass it as attn_mask"
        )
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
