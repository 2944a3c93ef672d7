"""Which ``mod_args`` take a gradient in the backward pass, and the checked per-score step that
computes it (``engine.kernels.mod_arg_grad``).

A learnable bias read by a ``score_mod`` (a relative-position table, ALiBi slopes, a per-key bias)
is a float array among ``mod_args``. Its gradient is the sum, over every score the mod rewrites,
of ``dS * d score_mod / d element``: each element the mod reads is found by a recorded gather and
differentiated by complex step, so the mod must be analytic in what it reads (the limits are in
``docs/training.md``). The step is compiled per mod and marks and checked once per mod, marks,
dtype and argument types against central finite differences at a few scores and indices of the
problem; a mod that fails either raises ``TypeError`` naming it before any kernel runs.
"""

from __future__ import annotations

import math

import numpy as np

from .mods import _first_cause, _mod_name, python_function

__all__ = ["mod_args_marks", "mod_args_offsets", "mod_args_grad_step"]


def mod_args_marks(return_mod_args_grad, mod_args: tuple) -> tuple:
    """``return_mod_args_grad`` as one bool per ``mod_args`` entry (``()`` for none wanted).

    ``False``: none. ``True``: every float NumPy array with at least one dimension. A tuple or list
    of bools, one per entry: those marked True, each of which must be such an array.

    :raises TypeError: not a bool or a sequence of bools.
    :raises ValueError: a sequence of the wrong length, or a mark on an entry that cannot take a
        gradient (an integer array, a number, a 0-d array), naming it.
    """
    if isinstance(return_mod_args_grad, (bool, np.bool_)):
        if not return_mod_args_grad:
            return ()
        marks = tuple(_learnable(a) for a in mod_args)
        return marks if any(marks) else ()
    if not isinstance(return_mod_args_grad, (tuple, list)) or not all(
        isinstance(m, (bool, np.bool_)) for m in return_mod_args_grad
    ):
        raise TypeError(
            "return_mod_args_grad must be a bool or a tuple of bools (one per mod_args entry), got "
            f"{return_mod_args_grad!r}"
        )
    if len(return_mod_args_grad) != len(mod_args):
        raise ValueError(
            f"return_mod_args_grad has {len(return_mod_args_grad)} entries but mod_args has {len(mod_args)}"
        )
    for i, (m, a) in enumerate(zip(return_mod_args_grad, mod_args)):
        if m and not _learnable(a):
            what = f"an array of dtype {a.dtype} and shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(
                f"mod_args[{i}] cannot take a gradient: only float arrays with at least one dimension "
                f"can (a learnable scalar is a 1-element array read as a[0]), got {what}"
            )
    marks = tuple(bool(m) for m in return_mod_args_grad)
    return marks if any(marks) else ()


def _learnable(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.ndim >= 1


def mod_args_offsets(marks: tuple, mod_args: tuple) -> np.ndarray:
    """int64 start of each marked array in the flat gradient buffer (0 for unmarked entries), and
    the buffer's length as the last entry."""
    offsets = np.zeros(len(mod_args) + 1, dtype=np.int64)
    total = 0
    for i, (m, a) in enumerate(zip(marks, mod_args)):
        if m:
            offsets[i] = total
            total += a.size
    offsets[-1] = total
    return offsets


#: (score_mod, marks) -> set of (dtype, argument types) already checked
_verified: dict = {}


def mod_args_grad_step(problem, marks: tuple):
    """The compiled per-score step (``engine.kernels.mod_arg_grad.arg_grad_kernel``) for the
    problem's score_mod and these marks, checked against finite differences once per mod, marks,
    dtype and argument types.

    :raises TypeError: naming the mod, when it cannot be evaluated on recorded gathers (it slices,
        compares or converts a marked element, calls a function with no complex version...), or
        when the gradient disagrees with finite differences.
    :raises ValueError: a single score reads more marked elements than the recording buffer holds.
    """
    from ..kernels.mod_arg_grad import READS_CAPACITY, arg_grad_kernel

    mod = problem.score_mod
    step = arg_grad_kernel(mod, marks)
    types = tuple((type(a).__name__, getattr(a, "dtype", None), getattr(a, "ndim", None)) for a in problem.mod_args)
    key = (python_function(mod), marks)
    seen = _verified.setdefault(key, set())
    if (problem.dtype.name, types) in seen:
        return step
    name = _mod_name(mod)
    which = ", ".join(f"mod_args[{i}]" for i, m in enumerate(marks) if m)
    offsets = mod_args_offsets(marks, problem.mod_args)
    buf = np.zeros(READS_CAPACITY + 1, dtype=np.int64)
    acc = np.zeros(int(offsets[-1]), dtype=np.float64)
    last = (max(problem.batch, 1) - 1, max(problem.num_q_heads, 1) - 1, max(problem.L, 1) - 1, max(problem.S, 1) - 1)
    points = [(0, 0, 0, 0), last, (0, last[1], last[2], 0), (last[0], 0, 0, last[3])]
    limits = (
        "a mod differentiated with respect to its mod_args may read their elements by integer indices "
        "only, and use them in arithmetic analytic in them (+, -, *, /, powers, np.exp, np.log, np.tanh, "
        "cast_like); no slices, comparisons, abs, int() or math.* functions of them"
    )
    try:
        compute = np.float32 if problem.dtype.itemsize == 2 else problem.dtype.type  # 16-bit: float32 kernels
        step(1.0, compute(0.5), *points[0], problem.mod_args, acc, buf, offsets)
    except Exception as exc:
        raise TypeError(
            f"score_mod {name} cannot be differentiated with respect to {which}: "
            f"{type(exc).__name__}: {_first_cause(exc)}; {limits}"
        ) from None
    py = python_function(mod)
    for x in (-1.3, 0.45):
        for idx in points:
            acc[:] = 0.0
            n = int(step(1.0, x, *idx, problem.mod_args, acc, buf, offsets))
            if n > READS_CAPACITY:
                raise ValueError(
                    f"score_mod {name} reads {n} elements of {which} for one score; the backward "
                    f"differentiates at most {READS_CAPACITY} per score"
                )
            for f in dict.fromkeys(int(r) for r in buf[1 : n + 1]):
                fd = _finite_difference(py, x, idx, problem.mod_args, marks, offsets, f)
                if fd is not None and not abs(acc[f] - fd) <= 1e-5 * (1.0 + abs(fd)):
                    m, local = _locate(marks, offsets, f, problem.mod_args)
                    raise TypeError(
                        f"score_mod {name}: wrong gradient with respect to mod_args[{m}]{local} at "
                        f"score={x}, (b, h, q_idx, kv_idx)={idx}: complex step gives {acc[f]:.6g}, "
                        f"finite differences {fd:.6g}; {limits}"
                    )
    seen.add((problem.dtype.name, types))
    return step


def _locate(marks, offsets, f: int, mod_args):
    for i, m in enumerate(marks):
        if m and offsets[i] <= f < offsets[i] + mod_args[i].size:
            return i, list(np.unravel_index(f - int(offsets[i]), mod_args[i].shape))
    raise AssertionError(f"flat index {f} outside the marked mod_args")


def _finite_difference(py, x, idx, mod_args, marks, offsets, f):
    """Central difference of the mod's Python function with respect to flat element ``f``, in
    float64 (None where the mod is not finite there, e.g. a score it masks with -inf)."""
    m, local = _locate(marks, offsets, f, mod_args)
    args = list(mod_args)
    base = np.array(mod_args[m], dtype=np.float64)
    theta = float(base[tuple(local)])
    eps = 1e-6 * max(1.0, abs(theta))
    values = []
    for sign in (1.0, -1.0):
        pert = base.copy()
        pert[tuple(local)] = theta + sign * eps
        args[m] = pert
        values.append(float(py(np.float64(x), *idx, *args)))
    if not all(math.isfinite(v) for v in values):
        return None
    return (values[0] - values[1]) / (2 * eps)
