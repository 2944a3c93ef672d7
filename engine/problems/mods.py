"""``score_mod`` and ``mask_mod``: attention patterns written as plain Python functions.

This is FlexAttention's idea on Numba. A ``score_mod(score, b, h, q_idx, kv_idx, *mod_args) ->
score`` rewrites one scaled score. A ``mask_mod(b, h, q_idx, kv_idx, *mod_args) -> bool`` says
whether query ``q_idx`` may attend to key ``kv_idx`` (True = may attend). Both are compiled with
``numba.njit`` and called inside the kernels, so a pattern never needs a dense L x S mask.

Captured parameters (per-head slopes, document ids...) are passed as an **explicit argument tuple**
``mod_args``. It is not a closure, so one compiled kernel serves every value of the parameters;
a closure over an array would freeze the array into the machine code and compile again for each new
one.

A :class:`BlockMask` records, once, which (query tile, key tile) blocks of a ``mask_mod`` are empty,
full or partial. Kernels skip empty blocks and evaluate the mask per element only in partial ones.
Build it with :func:`create_block_mask` and pass it again and again as ``block_mask=``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from numba import types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

__all__ = [
    "BlockMask",
    "create_block_mask",
    "as_jit",
    "cast_like",
    "with_score_grad",
    "score_mod_grad",
    "validate_mods",
    "compile_mods_alone",
    "python_function",
    "EMPTY",
    "PARTIAL",
    "FULL",
]

from ..kernels.kinds import TILE_EMPTY as EMPTY
from ..kernels.kinds import TILE_FULL as FULL
from ..kernels.kinds import TILE_PARTIAL as PARTIAL
from ..runtime.config import BLOCK_MASK_K, BLOCK_MASK_Q
from .arrays import native_mod_args
from .mod_bounds import mod_ranges, probe_mod_bounds
from .mod_compile import compile_mods_alone

_jitted: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def as_jit(fn: Callable, what: str) -> Callable:
    """The ``numba.njit(error_model="numpy")`` version of a mod, compiled once per function object.

    A function that is already ``numba.njit``-compiled is used as it is; give it
    ``error_model="numpy"`` too if it divides, or the zero check keeps its loop scalar."""
    from numba.core.registry import CPUDispatcher

    if isinstance(fn, CPUDispatcher):
        return fn
    if not callable(fn):
        raise TypeError(f"{what} must be a function, got {type(fn).__name__}")
    import types as pytypes

    if not isinstance(fn, pytypes.FunctionType):  # functools.partial, a bound method, a callable object
        raise TypeError(
            f"{what} must be a plain Python function (def or lambda) or a numba.njit function, got "
            f"{type(fn).__name__}: Numba compiles functions only; pass what a partial or an object holds "
            "through mod_args, or close over it"
        )
    if fn not in _jitted:
        import numba

        # NumPy's error model: x / 0 is inf/NaN, not an exception, so divisions vectorise
        _jitted[fn] = numba.njit(error_model="numpy")(fn)
    return _jitted[fn]


def cast_like(value, like):
    """``value`` converted to the float type of ``like`` (usually the score), in Python and in
    kernels. Mods use it to keep float32 scores in float32: NumPy's rules make int64 * float32 a
    float64, which halves the SIMD width and costs about 20% at L = 4096 for ALiBi.

    :param value: a number (an index, a constant).
    :type value: int | float
    :param like: a float scalar or array whose type to take.
    :type like: float | ndarray
    """
    return np.result_type(like).type(value)


@overload(cast_like, inline="always")
def _cast_like_overload(value, like):
    # complex: the score is complex while the backward differentiates the mod (complex step)
    if not isinstance(like, (types.Float, types.Complex)):
        return None
    np_type = as_dtype(like).type

    return lambda value, like: np_type(value)


def with_score_grad(score_grad: Callable):
    """Declare the derivative of a ``score_mod`` with respect to its score (a decorator).

    ``score_grad(score, b, h, q_idx, kv_idx, *mod_args)`` returns d score_mod / d score at that
    element. Declare it when the mod cannot be differentiated automatically (it compares or takes
    ``abs`` of the score, or calls a function Numba cannot evaluate on complex numbers, such as
    ``engine.kernels.fastexp.fast_tanh``), or when a closed form is cheaper::

        def softcap_grad(score, b, h, q_idx, kv_idx, cap):
            t = fast_tanh(score / cap)
            return 1 - t * t

        @with_score_grad(softcap_grad)
        def softcap(score, b, h, q_idx, kv_idx, cap):
            return cap * fast_tanh(score / cap)

    It sets the attribute ``score_grad`` on the mod (setting it by hand is the same).

    :param score_grad: ``score_grad(score, b, h, q_idx, kv_idx, *mod_args)``, a function Numba can
        compile, with the score_mod's signature.
    :return: a decorator that returns the score_mod with ``score_grad`` set.
    :raises TypeError: ``score_grad`` is not callable.
    """
    if not callable(score_grad):
        raise TypeError(f"score_grad must be a function, got {type(score_grad).__name__}")

    def declare(score_mod):
        score_mod.score_grad = score_grad
        return score_mod

    return declare


def _mod_name(fn) -> str:
    fn = getattr(fn, "py_func", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


#: score_mod (as the caller passed it) -> (compiled derivative, how it was found, {verified dtypes})
_grads: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def score_mod_grad(score_mod: Callable, problem) -> Callable:
    """The compiled derivative d score_mod / d score the backward kernels call.

    The mod's declared ``score_grad`` (see :func:`with_score_grad`), else the complex-step
    derivative of the mod itself (``engine.kernels.score_grad``). Either is compiled for the
    problem's dtype and checked once per mod and dtype against central finite differences of the
    mod at a few scores and indices of this problem (with its ``mod_args``).

    :raises TypeError: naming the mod, when it declares nothing and cannot be evaluated on complex
        numbers, or when the derivative disagrees with finite differences (a mod that compares or
        takes ``abs`` of the score: declare its derivative).
    """
    import numba

    from ..kernels.score_grad import complex_step_grad
    from ..kernels.specialise import named

    name = _mod_name(score_mod)
    declared = getattr(score_mod, "score_grad", None) or getattr(python_function(score_mod), "score_grad", None)
    entry = _grads.get(score_mod)
    if entry is None:
        if declared is not None:
            entry = (as_jit(declared, "score_grad"), "declared", set())
        else:
            env = dict(complex_step_grad.__globals__, _SCORE_MOD=as_jit(score_mod, "score_mod"))
            fn = named(complex_step_grad.__code__, env, "complex_step_grad", None)
            entry = (numba.njit(error_model="numpy")(fn), "complex-step", set())
        _grads[score_mod] = entry
    grad, how, verified = entry
    if problem.dtype.name not in verified:
        _check_against_finite_differences(problem.score_mod, grad, how, name, problem)
        verified.add(problem.dtype.name)
    return grad


def _check_against_finite_differences(mod, grad, how, name, problem) -> None:
    """Compile ``grad`` for the problem's dtype and compare it in float64 with central finite
    differences of ``mod`` at a few points; ``TypeError`` naming the mod otherwise."""
    # the kernels' arithmetic type: 16-bit problems compute in float32 (and NumPy's float16 or
    # ml_dtypes' bfloat16 scalars are not Numba types)
    dtype = np.float32 if problem.dtype.itemsize == 2 else problem.dtype.type
    last = (max(problem.batch, 1) - 1, max(problem.num_q_heads, 1) - 1, max(problem.L, 1) - 1, max(problem.S, 1) - 1)
    points = [(0, 0, 0, 0), last, (0, last[1], last[2], 0), (last[0], 0, 0, last[3])]
    hint = "declare its derivative with engine.problems.mods.with_score_grad (or set the attribute score_grad on it)"
    try:
        grad(dtype(0.5), *points[0], *problem.mod_args)  # the specialisation the kernel inlines
        for x in (-1.7, -0.2, 0.45, 1.3):
            for idx in points:
                g = float(grad(np.float64(x), *idx, *problem.mod_args))
                eps = 1e-6 * max(1.0, abs(x))
                hi = float(mod(np.float64(x + eps), *idx, *problem.mod_args))
                lo = float(mod(np.float64(x - eps), *idx, *problem.mod_args))
                fd = (hi - lo) / (2 * eps)
                if not (math.isfinite(hi) and math.isfinite(lo)):
                    continue  # e.g. a mod that masks this element with -inf: its weight is 0
                if not abs(g - fd) <= 1e-5 * (1.0 + abs(fd)):
                    raise _Mismatch(
                        f"at score={x}, (b, h, q_idx, kv_idx)={idx} the {how} derivative is "
                        f"{g:.6g} but finite differences give {fd:.6g}"
                    )
    except _Mismatch as exc:
        extra = (
            " (complex-step differentiation needs a mod analytic in the score: no comparison or abs of it)"
            if how == "complex-step"
            else ""
        )
        raise TypeError(f"score_mod {name}: wrong derivative {exc}{extra}; {hint}") from None
    except Exception as exc:
        first = _first_cause(exc)
        if how == "complex-step":
            raise TypeError(
                f"score_mod {name} has no derivative for the backward pass: it cannot be "
                f"evaluated on a complex score (complex-step differentiation): "
                f"{type(exc).__name__}: {first}; {hint}"
            ) from None
        raise TypeError(
            f"score_grad of score_mod {name} failed to compile or run: {type(exc).__name__}: {first}"
        ) from None


class _Mismatch(Exception):
    pass


def _first_cause(exc: Exception) -> str:
    """The informative line of an exception: for Numba's typing errors, the call it could not
    type (e.g. ``fast_tanh(complex128)``), not the pipeline banner."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(">>>"):
            return "no implementation of " + ln[3:].strip()
    for ln in lines:
        if not ln.startswith("Failed in nopython mode pipeline"):
            return ln
    return lines[0] if lines else ""


def python_function(fn: Callable) -> Callable:
    """The pure-Python function behind a mod (for the reference backend)."""
    return getattr(fn, "py_func", fn)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which (query tile, key tile) blocks a ``mask_mod`` leaves empty, partial or full.

    ``kinds`` has shape ``(Bm, Hm, ceil(L / block_q), ceil(S / block_k))`` with values EMPTY,
    PARTIAL, FULL. ``Bm``/``Hm`` are 1 when the mask was built with ``batch=None``/``heads=None``
    (it does not depend on b/h), else the batch and head counts.
    """

    mask_mod: Callable
    mod_args: tuple
    kinds: np.ndarray
    L: int
    S: int
    block_q: int
    block_k: int
    _by_tiles: dict = field(default_factory=dict, repr=False)

    def kinds_at(self, block_q: int, block_k: int) -> np.ndarray:
        """The tile map for other tile sizes, derived once and memoised.

        :param block_q: tile rows.
        :param block_k: tile columns.
        """
        want = (min(block_q, max(self.L, 1)), min(block_k, max(self.S, 1)))
        if want == (min(self.block_q, max(self.L, 1)), min(self.block_k, max(self.S, 1))):
            return self.kinds
        if want not in self._by_tiles:
            Bm, Hm = self.kinds.shape[:2]
            other = create_block_mask(
                self.mask_mod,
                Bm if Bm > 1 else None,
                Hm if Hm > 1 else None,
                self.L,
                self.S,
                mod_args=self.mod_args,
                block_q=block_q,
                block_k=block_k,
            )
            self._by_tiles[want] = other.kinds
        return self._by_tiles[want]

    @property
    def density(self) -> float:
        """Fraction of blocks that are not empty (what the kernels actually visit)."""
        return float(np.mean(self.kinds != EMPTY)) if self.kinds.size else 0.0

    def check_compatible(self, batch: int, heads: int, L: int, S: int) -> None:
        """``ValueError`` naming the shapes if this block mask was built for another problem.

        :param batch: the problem's flattened batch.
        :param heads: its query heads.
        :param L: its query rows.
        :param S: its keys.
        """
        Bm, Hm = self.kinds.shape[:2]
        if (self.L, self.S) != (L, S) or Bm not in (1, batch) or Hm not in (1, heads):
            raise ValueError(
                f"block_mask was built for (batch, heads, L, S) = ({Bm}, {Hm}, {self.L}, "
                f"{self.S}) but the inputs have ({batch}, {heads}, {L}, {S})"
            )


def create_block_mask(
    mask_mod: Callable,
    batch: int | None,
    heads: int | None,
    L: int,
    S: int,
    *,
    mod_args: tuple = (),
    block_q: int = BLOCK_MASK_Q,
    block_k: int = BLOCK_MASK_K,
) -> BlockMask:
    """Evaluate ``mask_mod`` once over every (b, h, q_idx, kv_idx) and classify the tiles.

    Pass ``batch=None``/``heads=None`` when the mask does not depend on ``b``/``h`` (it is then
    evaluated for b = h = 0 only). Cost: one mask evaluation per element, in parallel, and memory of
    one byte per tile.

    :param mask_mod: ``mask_mod(b, h, q_idx, kv_idx, *mod_args) -> bool``, True = may attend.
    :param batch: flattened batch size, or None when the mask does not depend on ``b``.
    :param heads: query heads, or None when the mask does not depend on ``h``.
    :param L: query rows.
    :param S: keys.
    :param mod_args: the mask's extra arguments (passed again with the block mask, not separately).
    :param block_q: tile rows.
    :param block_k: tile columns.
    :raises ValueError: a bad size, or ``mask_mod`` indexing ``mod_args`` out of bounds at a corner
        of the indices (:func:`~engine.problems.mod_bounds.probe_mod_bounds`).
    :raises TypeError: ``mod_args`` not a tuple, or ``mask_mod``'s signature does not take them.
    """
    from ..kernels.block_sparsity import classify_blocks
    from ..runtime.threads import kernel_call_guard

    for name, val in (("L", L), ("S", S)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    for name, val in (("batch", batch), ("heads", heads)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1):
            raise ValueError(f"{name} must be a positive int or None, got {val!r}")
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    mod_args = native_mod_args(mod_args)
    fn = as_jit(mask_mod, "mask_mod")
    _check_mod_arity(fn, "mask_mod", "b, h, q_idx, kv_idx", len(mod_args))
    probe_mod_bounds(None, fn, mod_args, mod_ranges(batch or 1, heads or 1, (0, L - 1), (0, S - 1)))
    kinds = np.empty((batch or 1, heads or 1, math.ceil(L / block_q), math.ceil(S / block_k)), np.int8)
    if kinds.size:
        with kernel_call_guard():
            classify_blocks(fn, mod_args, L, S, block_q, block_k, kinds)
    return BlockMask(fn, mod_args, kinds, int(L), int(S), int(block_q), int(block_k))


def validate_mods(score_mod, mask_mod, block_mask, mod_args, batch, heads, L, S, positions=None, probe=True) -> dict:
    """Check the mods' signatures, the block mask against the problem, and (``probe_mod_bounds``,
    unless ``probe`` is False: the caller probes) that the mods index ``mod_args`` within bounds
    at the corners of the indices the call passes: ``b < batch``, ``h < heads``, and ``positions
    = ((q_lo, q_hi), (kv_lo, kv_hi))`` (inclusive; default ``q_idx < L``, ``kv_idx < S``)."""
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    if score_mod is None and mask_mod is None and block_mask is None:
        if mod_args:
            raise ValueError("mod_args given without score_mod, mask_mod or block_mask")
        return {}
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must come from engine.create_block_mask, got {type(block_mask).__name__}")
        block_mask.check_compatible(batch, heads, L, S)
        if mask_mod is not None and as_jit(mask_mod, "mask_mod") is not block_mask.mask_mod:
            raise ValueError("mask_mod differs from the mask_mod block_mask was built with; pass one of them")
        if mod_args and mod_args is not block_mask.mod_args:
            raise ValueError("pass mod_args to create_block_mask, not again with block_mask")
        mask_mod, mod_args = block_mask.mask_mod, block_mask.mod_args
    mod_args = native_mod_args(mod_args)
    for name, mod, fixed in (
        ("score_mod", score_mod, "score, b, h, q_idx, kv_idx"),
        ("mask_mod", mask_mod, "b, h, q_idx, kv_idx"),
    ):
        if mod is not None:
            _check_mod_arity(mod, name, fixed, len(mod_args))
    score_mod = None if score_mod is None else as_jit(score_mod, "score_mod")
    mask_mod = None if mask_mod is None else as_jit(mask_mod, "mask_mod")
    q_range, kv_range = positions if positions is not None else ((0, L - 1), (0, S - 1))
    if probe:
        probe_mod_bounds(score_mod, mask_mod, mod_args, mod_ranges(batch, heads, q_range, kv_range))
    return {
        "score_mod": score_mod,
        "mask_mod": mask_mod,
        "mod_args": mod_args,
        "block_mask": block_mask,
    }


def _check_mod_arity(mod, name: str, fixed: str, n_args: int) -> None:
    """A mod must take its fixed arguments and then one per ``mod_args`` entry: checked here, so a
    wrong signature is a TypeError naming the mod instead of a Numba typing error from the kernel."""
    import inspect

    try:
        sig = inspect.signature(python_function(mod))
    except (TypeError, ValueError):  # a builtin or a compiled function without a signature
        return
    count = fixed.count(",") + 1 + n_args
    defaults = [p.name for p in sig.parameters.values() if p.default is not inspect.Parameter.empty]
    if defaults:  # Numba types a call by its arguments: a default makes its signature unmatched
        raise TypeError(
            f"{name} {getattr(mod, '__name__', mod)!r} has default arguments ({', '.join(defaults)}); "
            "mods take every argument positionally: pass such values through mod_args, or close over them"
        )
    try:
        sig.bind(*range(count))
    except TypeError:
        raise TypeError(
            f"{name} {getattr(mod, '__name__', mod)!r} must take {count} positional arguments ({fixed}, then "
            f"one per mod_args entry: {n_args}), but its signature is {sig}"
        ) from None
