"""The baselines and building blocks of the benchmark: torch's layers loaded with a variant's
weights, plain NumPy attention, operation counts (also used by ``bench/``)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = [
    "available_backends",
    "numpy_sdpa",
    "sdpa_flop",
    "variant_flop",
    "torch_mha_like",
    "torch_mha_forward",
    "as_torch_inputs",
    "device_synchronizer",
]


def available_backends() -> list[str]:
    """Registered backends that can run on this machine (their ``unavailable_reason()`` is None)."""
    import engine

    return [n for n in engine.list_backends() if engine.get_backend(n).unavailable_reason() is None]


def numpy_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Plain NumPy attention in the inputs' dtype, materialising the (..., L, S) scores.

    The textbook implementation a user would write, without masks: the memory baseline that grows
    quadratically with sequence length.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= scale
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def sdpa_flop(batch: int, heads: int, L: int, S: int, head_dim: int) -> int:
    """Floating-point operations of both attention products (as ``AttentionProblem.flops``)."""
    return 2 * batch * heads * L * S * (head_dim + head_dim)


def variant_flop(variant, inputs: dict) -> int:
    """Operations of one variant call: ``2·N·L·|W|`` for every 2-D parameter (the projections)
    plus ``4·N·L·S·embed_dim`` for the two attention products; no causal discount.

    Exact for the built-in variants when S = L (the sweep's inputs); an estimate for plugins.
    """
    q = inputs["query"]
    N, L = (1, q.shape[0]) if q.ndim == 2 else q.shape[:2]
    k = inputs.get("key")
    S = L if k is None else k.shape[-2]
    weights = sum(p.size for p in variant.state_dict().values() if p.ndim == 2)
    E = getattr(variant, "embed_dim", q.shape[-1])
    return int(2 * N * L * weights + 4 * N * L * S * E)


def torch_mha_like(variant):
    """``(module, None)``: a ``torch.nn.MultiheadAttention(batch_first=True)`` in eval mode with
    the variant's weights, or ``(None, reason)`` when the variant's parameters do not map onto one.

    Sizes come from the variant's ``embed_dim``, ``num_heads``, ``kdim``, ``vdim`` attributes and
    the presence of ``in_proj_bias``. A variant without ``out_proj.*`` (``self``) gets an identity
    output projection, so both compute the same function.
    """
    import torch

    E = getattr(variant, "embed_dim", None)
    if not isinstance(E, int):
        return None, f"variant {variant.name!r} has no integer embed_dim"
    H = getattr(variant, "num_heads", 1)
    state = variant.state_dict()
    try:
        mha = torch.nn.MultiheadAttention(
            E,
            H,
            bias="in_proj_bias" in state,
            batch_first=True,
            kdim=getattr(variant, "kdim", E),
            vdim=getattr(variant, "vdim", E),
            dtype=torch.float64 if variant.dtype == np.float64 else torch.float32,
        )
    except Exception as exc:
        return None, f"torch.nn.MultiheadAttention cannot take the sizes of {variant.name!r}: {exc}"
    target = mha.state_dict()
    extra = sorted(set(state) - set(target))
    if extra:
        return None, f"parameters {extra} of {variant.name!r} have no place in nn.MultiheadAttention"
    loaded = {}
    for key, ref in target.items():
        if key in state:
            if tuple(state[key].shape) != tuple(ref.shape):
                return None, f"{key} has shape {state[key].shape}, torch expects {tuple(ref.shape)}"
            loaded[key] = torch.from_numpy(np.array(state[key])).to(ref.dtype)
        elif key == "out_proj.weight":
            loaded[key] = torch.eye(E, dtype=ref.dtype)
        elif key == "out_proj.bias":
            loaded[key] = torch.zeros(E, dtype=ref.dtype)
        else:
            return None, f"{variant.name!r} has no parameter {key!r}"
    mha.load_state_dict(loaded)
    return mha.eval(), None


def torch_mha_forward(mha, inputs: dict, causal: bool):
    """Call the torch module on the variant's example inputs (torch tensors), ``need_weights=False``.

    ``causal`` adds the top-left causal mask (``is_causal=True`` with its explicit mask, as torch
    requires); ``key_padding_mask`` and ``attn_mask`` in ``inputs`` are passed through, keywords
    torch does not know (a variant's own, e.g. ``document_ids``) are left out.
    """
    import torch

    q = inputs["query"]
    k = inputs.get("key", q)
    v = inputs.get("value", k)
    extra = {n: x for n, x in inputs.items() if n in ("key_padding_mask", "attn_mask")}
    if causal:
        L, S = q.shape[-2], k.shape[-2]
        extra["attn_mask"] = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=1)
        extra["is_causal"] = True
    with torch.inference_mode():
        return mha(q, k, v, need_weights=False, **extra)[0]


def as_torch_inputs(inputs: dict) -> dict:
    """The same inputs as torch tensors sharing memory with the NumPy arrays."""
    import torch

    return {n: torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for n, x in inputs.items()}


def device_synchronizer(backend: str | None) -> Callable[[], None]:
    """A function that waits for the device after a call, for backends that take device arrays
    (so CUDA timings include the kernel); a no-op for host backends and baselines."""
    if backend is None:
        return lambda: None
    import engine

    if not engine.get_backend(backend).device_arrays:
        return lambda: None
    try:
        from numba import cuda

        if cuda.is_available():
            return cuda.synchronize
    except Exception:
        pass
    return lambda: None
