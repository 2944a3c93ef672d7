"""The interface every backend implements (capabilities as class attributes, as xFormers ops)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..validation import AttentionProblem

__all__ = ["Backend", "empty_result", "empty_gradients", "dtype_name"]


class Backend:
    """One way to compute attention. Subclasses set the class attributes and implement ``run``
    (and ``run_backward`` when ``supports_backward``).

    ``run``/``run_backward`` are only called on problems for which ``not_supported_reasons``
    returned ``[]``, and only for non-empty problems (L, S, batch and heads all >= 1); the
    dispatcher handles empty ones.
    """

    name: str = ""
    description: str = ""
    #: dtype names this backend computes in
    dtypes: tuple = ("float32", "float64")
    #: whether it accepts host (NumPy) arrays and device (``__cuda_array_interface__``) arrays
    host_arrays: bool = True
    device_arrays: bool = False
    #: whether ``score_mod``/``mask_mod`` are compiled into this backend's kernels
    supports_mods: bool = False
    #: whether ``run_backward`` computes gradients (training)
    supports_backward: bool = False
    #: whether ``dropout_p > 0`` is applied (forward, and backward when it has one)
    supports_dropout: bool = False
    #: whether its kernels take a causal diagonal offset (``engine.causal_lower_right``)
    supports_causal_offset: bool = False
    #: whether it runs ``engine.attention_with_kvcache`` (``decode``), for which query dtypes and
    #: which cache dtypes
    supports_decode: bool = False
    decode_dtypes: tuple = ()
    decode_cache_dtypes: tuple = ()
    #: ``auto`` tries backends from the highest priority down
    priority: int = 0

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (``None`` when it can)."""
        return None

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        """Every reason this backend cannot run ``problem``; empty when it can."""
        if getattr(problem, "is_decode", False):
            return self.decode_not_supported_reasons(problem)
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if dtype_name(problem.dtype) not in self.dtypes:
            reasons.append(f"dtype {problem.dtype.name} not supported (supports {', '.join(self.dtypes)})")
        if problem.on_device and not self.device_arrays:
            reasons.append("inputs are device arrays; this backend takes host arrays")
        if not problem.on_device and not self.host_arrays:
            reasons.append("inputs are host arrays; this backend takes device arrays")
        if problem.has_mods and not self.supports_mods:
            reasons.append("score_mod/mask_mod are not supported by this backend")
        if problem.needs_backward and not self.supports_backward:
            reasons.append("no backward pass (gradients) in this backend")
        if problem.dropout_p > 0 and not self.supports_dropout:
            reasons.append("dropout_p > 0 is not supported by this backend")
        if getattr(problem, "causal_offset", 0) and not self.supports_causal_offset:
            reasons.append(
                "a bottom-right causal mask (causal_lower_right with L != S) is not supported by this backend"
            )
        return reasons

    def run(self, problem: AttentionProblem) -> tuple[Any, Any]:
        """Compute ``(out, lse)``: out of ``problem.out_shape``, lse of ``problem.lse_shape``.

        Fully masked rows give zeros in ``out`` and ``-inf`` in ``lse``.
        """
        raise NotImplementedError

    def run_backward(self, problem: AttentionProblem) -> tuple[Any, Any, Any, Any]:
        """Gradients ``(dq, dk, dv, dmask)`` of a backward problem (``problem.needs_backward``).

        ``dq``/``dk``/``dv`` have the shapes and dtype of query/key/value; ``dmask`` is the gradient
        of the floating ``attn_mask``, in its shape and dtype (summed over the dimensions it
        broadcasts along), when ``problem.return_mask_grad``, else None.
        """
        raise NotImplementedError

    def decode_not_supported_reasons(self, problem) -> list[str]:
        """Every reason this backend cannot run a ``DecodeProblem`` (``attention_with_kvcache``)."""
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if not self.supports_decode:
            reasons.append("KV-cache decoding (attention_with_kvcache) is not supported by this backend")
            return reasons
        if dtype_name(problem.dtype) not in self.decode_dtypes:
            reasons.append(
                f"query dtype {problem.dtype.name} not supported for decoding (supports "
                f"{', '.join(self.decode_dtypes)})"
            )
        if dtype_name(problem.cache_dtype) not in self.decode_cache_dtypes:
            reasons.append(
                f"cache dtype {problem.cache_dtype.name} not supported (supports {', '.join(self.decode_cache_dtypes)})"
            )
        if problem.on_device and not self.device_arrays:
            reasons.append("inputs are device arrays; this backend takes host arrays")
        if problem.has_mods and not self.supports_mods:
            reasons.append("score_mod/mask_mod are not supported by this backend")
        return reasons

    def decode(self, problem) -> tuple[Any, Any]:
        """Write ``problem.key``/``problem.value`` into the caches at ``problem.cache_seqlens``, then
        attend: ``(out, lse)`` of ``problem.out_shape``/``problem.lse_shape`` in ``problem.dtype``.

        Only called when ``decode_not_supported_reasons`` is empty, after validation checked every
        index (the write cannot fail half-way).
        """
        raise NotImplementedError

    def capabilities(self) -> dict:
        """What ``attention-engine list`` prints about this backend."""
        why = self.unavailable_reason()
        return {
            "name": self.name,
            "description": self.description,
            "dtypes": list(self.dtypes),
            "host_arrays": self.host_arrays,
            "device_arrays": self.device_arrays,
            "mods": self.supports_mods,
            "backward": self.supports_backward,
            "dropout": self.supports_dropout,
            "causal_lower_right": self.supports_causal_offset,
            "decode": self.supports_decode,
            "priority": self.priority,
            "available": why is None,
            "unavailable_reason": why,
        }


_dtype_names: dict = {}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, memoised: NumPy computes it in Python on every access (microseconds, paid on
    every call's backend check)."""
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = dtype.name
    return name


def empty_result(problem: AttentionProblem):
    """The result of a problem with L, S, batch or heads equal to 0 (host arrays).

    S = 0 gives zeros and lse = -inf, as torch; any other zero size gives empty arrays.
    """
    out = np.zeros(problem.out_shape, dtype=problem.dtype)
    lse = np.full(problem.lse_shape, -np.inf, dtype=problem.dtype)
    return out, lse


def empty_gradients(problem: AttentionProblem):
    """Gradients of a problem with L, S, batch or heads equal to 0 (host arrays): zeros (no score
    exists, so nothing depends on the inputs), the mask's gradient too when it is asked for."""
    grads = tuple(np.zeros(a.shape, dtype=problem.dtype) for a in (problem.query, problem.key, problem.value))
    dmask = None
    if problem.return_mask_grad:
        dmask = np.zeros(problem.attn_mask.shape, dtype=problem.attn_mask.dtype)
    return grads + (dmask,)
