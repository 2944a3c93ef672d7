"""The interface every backend implements: a :class:`Backend` is a name, a priority and its ops; an
:class:`Op` is one capability (forward, backward, decoding, ...) with what it supports declared as
class attributes and a ``run`` method, as xFormers' ``FwOp``/``BwOp``.

A problem type states what it needs (``engine.problems.base.Problem.requirements``); an op offers
it through class attributes of the same names (``dtypes``, ``device_arrays``, ``supports_mods``,
``supports_dropout``, ...). :meth:`Op.not_supported_reasons` compares the two, so a new capability
(a problem type, a public function, one op module per backend) never touches this module.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..problems.base import Problem

__all__ = ["Backend", "Op", "empty_result", "empty_gradients"]


class Op:
    """One capability of a backend: the problems of type ``problem_type`` it can run.

    Subclasses set ``problem_type``, the class attributes below that differ from the defaults, and
    implement :meth:`run`; they may extend :meth:`not_supported_reasons` with checks of their own
    (call ``super()`` first). ``run`` is only called on problems for which
    ``not_supported_reasons`` returned ``[]``, and (for attention problems) only non-empty ones:
    the public functions answer empty problems themselves. ``self.backend`` is the backend
    instance the op belongs to.
    """

    #: the problem type this op runs (``engine.problems``' ``AttentionProblem``, ``BackwardProblem``,
    #: ``DecodeProblem``, ...)
    problem_type: ClassVar[type]
    #: dtype names it computes in (the query's, for decoding)
    dtypes: ClassVar[tuple] = ("float32", "float64")
    #: whether it accepts host (NumPy) arrays and device (``__cuda_array_interface__``) arrays
    host_arrays: ClassVar[bool] = True
    device_arrays: ClassVar[bool] = False
    #: whether ``score_mod``/``mask_mod`` are compiled into its kernels
    supports_mods: ClassVar[bool] = False
    #: whether ``dropout_p > 0`` is applied
    supports_dropout: ClassVar[bool] = False
    #: whether its kernels take a causal diagonal offset (``engine.causal_lower_right``)
    supports_causal_offset: ClassVar[bool] = False

    def __init__(self, backend: Backend):
        self.backend = backend

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        """Every reason this op cannot run ``problem`` (``problem.requirements()`` that this op's
        class attributes do not meet); empty when it can."""
        reasons = []
        for req in problem.requirements():
            offered = getattr(self, req.attribute, ())
            ok = bool(offered) if req.value is True else req.value in offered
            if not ok:
                supported = ", ".join(offered) if isinstance(offered, tuple) else str(offered)
                reasons.append(req.reason.replace("{supported}", supported))
        return reasons

    def run(self, problem: Problem) -> Any:
        """Compute the problem's result (``(out, lse)`` for forward and decoding, the gradients
        ``(dq, dk, dv, dmask)`` for the backward)."""
        raise NotImplementedError

    @classmethod
    def capabilities(cls) -> dict:
        """What ``attention-engine list`` prints about this op: every public class attribute that
        is a flag or a tuple of names (a capability's own ones, such as a decode op's
        ``cache_dtypes``, included), ``supports_x`` as ``x``."""
        caps = {}
        for name in sorted(n for n in dir(cls) if not n.startswith("_")):
            value = getattr(cls, name)
            if isinstance(value, bool) or (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                caps[name.removeprefix("supports_")] = list(value) if isinstance(value, tuple) else value
        caps["causal_lower_right"] = caps.pop("causal_offset", False)
        return caps


class Backend:
    """One way to compute attention: a name, a priority for ``backend="auto"``, whether it can run
    on this machine at all, and one :class:`Op` per capability (``ops``, a tuple of Op subclasses,
    each for its own problem type).

    Backends are plugins (the ``attention_backends`` hook). The dispatcher
    (``engine.dispatch.select``) asks :meth:`not_supported_reasons`, then runs
    ``backend.op(type(problem)).run(problem)``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: ``auto`` tries backends from the highest priority down
    priority: ClassVar[int] = 0
    #: the capabilities: Op subclasses, one per problem type
    ops: ClassVar[tuple] = ()

    def __init__(self):
        self._ops = {cls.problem_type: cls(self) for cls in self.ops}

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all (``None`` when it can)."""
        return None

    def op(self, problem_type: type) -> Op | None:
        """The op that runs problems of ``problem_type``, or None when this backend has none.

        :param problem_type: a problem type (``AttentionProblem``, ``BackwardProblem``,
            ``DecodeProblem``...).
        """
        return self._ops.get(problem_type)

    def run(self, problem: Problem) -> Any:
        """``problem`` on the op of its type, without the support check (the dispatcher checks
        first; tests and benchmarks that picked the backend themselves call this).

        :param problem: a validated problem (``engine.problems``).
        """
        op = self.op(type(problem))
        if op is None:
            raise TypeError(f"backend {self.name!r} has no op for {type(problem).__name__}")
        return op.run(problem)

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        """Every reason this backend cannot run ``problem``; empty when it can. A problem may need
        ops for other problem types too (``problem.also_runs()``: a forward whose gradient will be
        asked for needs the backward op).

        :param problem: a validated problem (``engine.problems``).
        """
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        for problem_type in (type(problem),) + tuple(problem.also_runs()):
            op = self.op(problem_type)
            if op is None:
                reasons.append(problem_type.missing_op_reason)
            else:
                reasons += [r for r in op.not_supported_reasons(problem) if r not in reasons]
        return reasons

    # -- what a backend offers, read from its ops (``attention-engine list``, tests) -----------
    def _forward(self) -> Op | None:
        from ..problems.attention import AttentionProblem

        return self.op(AttentionProblem)

    def _flag(self, attribute: str):
        op = self._forward()
        return getattr(op, attribute) if op is not None else type(getattr(Op, attribute))()

    @property
    def dtypes(self) -> tuple:
        """The forward op's dtypes."""
        return self._flag("dtypes")

    @property
    def host_arrays(self) -> bool:
        return self._flag("host_arrays")

    @property
    def device_arrays(self) -> bool:
        return self._flag("device_arrays")

    @property
    def supports_mods(self) -> bool:
        return self._flag("supports_mods")

    @property
    def supports_dropout(self) -> bool:
        return self._flag("supports_dropout")

    @property
    def supports_causal_offset(self) -> bool:
        return self._flag("supports_causal_offset")

    @property
    def supports_backward(self) -> bool:
        from ..problems.attention import BackwardProblem

        return self.op(BackwardProblem) is not None

    @property
    def supports_decode(self) -> bool:
        from ..problems.decode import DecodeProblem

        return self.op(DecodeProblem) is not None

    def capabilities(self) -> dict:
        """What ``attention-engine list`` prints about this backend: the forward's flags at the
        top level (as before ops existed), and every op's under ``ops`` by capability."""
        why = self.unavailable_reason()
        forward = self._forward()
        caps = {
            "name": self.name,
            "description": self.description,
            **(forward.capabilities() if forward is not None else Op.capabilities()),
            "backward": self.supports_backward,
            "decode": self.supports_decode,
            "priority": self.priority,
            "available": why is None,
            "unavailable_reason": why,
            "ops": {cls.problem_type.__name__: cls.capabilities() for cls in self.ops},
        }
        return caps


def empty_result(problem):
    """The result of a problem with L, S, batch or heads equal to 0 (host arrays).

    S = 0 gives zeros and lse = -inf, as torch; any other zero size gives empty arrays.
    """
    out = np.zeros(problem.out_shape, dtype=problem.dtype)
    lse = np.full(problem.lse_shape, -np.inf, dtype=problem.dtype)
    return out, lse


def empty_gradients(problem):
    """Gradients of a problem with L, S, batch or heads equal to 0 (host arrays): zeros (no score
    exists, so nothing depends on the inputs), the mask's gradient too when it is asked for."""
    grads = tuple(np.zeros(a.shape, dtype=problem.dtype) for a in (problem.query, problem.key, problem.value))
    dmask = None
    if problem.return_mask_grad:
        dmask = np.zeros(problem.attn_mask.shape, dtype=problem.attn_mask.dtype)
    return grads + (dmask,)
