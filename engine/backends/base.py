"""The interface every backend implements (capabilities as class attributes, as xFormers ops)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..validation import AttentionProblem

__all__ = ["Backend", "empty_result", "empty_gradients"]


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
    #: ``auto`` tries backends from the highest priority down
    priority: int = 0

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (``None`` when it can)."""
        return None

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        """Every reason this backend cannot run ``problem``; empty when it can."""
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if problem.dtype.name not in self.dtypes:
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

    def capabilities(self) -> dict:
        """What ``attention-engine list`` prints about this backend."""
        why = self.unavailable_reason()
        return {"name": self.name, "description": self.description, "dtypes": list(self.dtypes),
                "host_arrays": self.host_arrays, "device_arrays": self.device_arrays,
                "mods": self.supports_mods, "backward": self.supports_backward,
                "dropout": self.supports_dropout,
                "priority": self.priority, "available": why is None, "unavailable_reason": why}


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
