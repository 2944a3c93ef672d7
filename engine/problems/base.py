"""What every problem type shares: the fields a backend op reads whatever the capability, and the
requirements a problem states so that an op can say, generically, why it cannot run it.

A capability is one problem type (:class:`~engine.problems.attention.AttentionProblem`,
:class:`~engine.problems.backward.BackwardProblem`,
:class:`~engine.problems.decode.DecodeProblem`, ...), one public function that validates the
arguments into it, and one op per backend (``engine.backends.base.Op``). The problem lists what
it needs (:meth:`Problem.requirements`: a dtype, device arrays, mods, dropout...); an op declares
what it offers as class attributes of the same names. Neither the dispatcher nor
``engine.backends.base`` changes when a capability is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["Problem", "Requirement", "dtype_name", "check_bool", "check_scale", "real_float"]


@dataclass(frozen=True)
class Requirement:
    """One thing a problem needs from the op that runs it.

    The op satisfies it when its class attribute ``attribute`` is true (``value is True``: a flag
    such as ``supports_mods``) or contains ``value`` (a name in a tuple such as ``dtypes``).
    ``reason`` is what the op says when it does not; ``{supported}`` in it becomes the op's
    values of ``attribute`` (e.g. its dtypes)."""

    attribute: str
    value: Any
    reason: str


_dtype_names: dict = {}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, memoised: NumPy computes it in Python on every access (microseconds, paid on
    every call's backend check)."""
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = dtype.name
    return name


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A validated call: the fields every capability shares.

    ``query`` is a NumPy array for host inputs or the caller's device array; ``dtype`` its dtype
    (the output's). ``num_q_heads``/``num_kv_heads`` (GQA: the second divides the first), ``L``
    query rows, ``E``/``Ev`` the key and value head sizes, ``scale`` the score scale,
    ``return_lse`` whether the caller wants the log-sum-exp, ``on_device`` whether the arrays are
    device arrays. ``score_mod``/``mask_mod`` are the compiled (``numba.njit``) mods or None and
    ``mod_args`` their argument tuple (``engine.problems.mods``). ``sinks``: None, or the
    attention sinks (``(num_q_heads,)``, host, the caller's float dtype), which the public functions
    apply around the op (``engine.problems.sinks``): ops never see them but in a backward problem.
    """

    #: what a backend lacking an op for this problem type says (``engine.backends.base``)
    missing_op_reason: ClassVar[str] = "this capability is not supported by this backend"

    query: Any
    dtype: np.dtype
    num_q_heads: int
    num_kv_heads: int
    L: int
    E: int
    Ev: int
    scale: float
    return_lse: bool
    on_device: bool
    score_mod: Any = None
    mask_mod: Any = None
    mod_args: tuple = ()
    sinks: Any = None

    @property
    def has_mods(self) -> bool:
        return self.score_mod is not None or self.mask_mod is not None

    @property
    def group(self) -> int:
        """Query heads served by one key/value head (1 without GQA; 1 with no heads at all, an empty
        problem, which validation allows only with no query heads either)."""
        return self.num_q_heads // self.num_kv_heads if self.num_kv_heads else 1

    def requirements(self) -> list[Requirement]:
        """What an op must offer to run this problem (subclasses add their own)."""
        reqs = [
            Requirement(
                "dtypes",
                dtype_name(self.dtype),
                f"dtype {dtype_name(self.dtype)} not supported (supports {{supported}})",
            )
        ]
        if self.on_device:
            reqs.append(Requirement("device_arrays", True, "inputs are device arrays; this backend takes host arrays"))
        else:
            reqs.append(Requirement("host_arrays", True, "inputs are host arrays; this backend takes device arrays"))
        if self.has_mods:
            reqs.append(Requirement("supports_mods", True, "score_mod/mask_mod are not supported by this backend"))
        if self.sinks is not None and self.on_device:
            # no op offers it: the sink step (engine.problems.sinks) runs on host arrays
            reqs.append(Requirement("device_sinks", True, "sinks with device arrays are not supported yet"))
        return reqs

    def also_runs(self) -> tuple:
        """Other problem types whose ops must accept this problem too (a forward whose gradient
        will be asked for needs the backward op as well)."""
        return ()


def check_bool(value, name: str) -> bool:
    """``value`` as a bool; ``TypeError`` naming ``name`` for anything but a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def real_float(value, name: str, must: str) -> float:
    """``float(value)`` of a real number already type-checked; a Python int too large for a
    float64 (where ``float`` raises ``OverflowError``) is refused with ``ValueError`` naming
    ``name``: "``name`` must ``must``"."""
    try:
        return float(value)
    except OverflowError:
        sign = "a negative" if value < 0 else "an"
        raise ValueError(f"{name} must {must}, got {sign} integer of {int(value).bit_length()} bits") from None


def check_scale(scale, E: int, shapes: str) -> float:
    """The score scale: ``1/sqrt(E)`` for None, else a finite real number. ``shapes`` names the
    inputs for the error when E = 0 leaves no default."""
    if scale is None:
        if E == 0:
            raise ValueError(f"the default scale 1/sqrt(E) needs E >= 1, got {shapes}; pass scale=")
        return 1.0 / math.sqrt(E)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale_f = real_float(scale, "scale", "be finite")
    if not math.isfinite(scale_f):
        raise ValueError(f"scale must be finite, got {scale_f}")
    return scale_f
