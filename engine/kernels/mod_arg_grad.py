"""The gradient of a ``score_mod`` with respect to the ``mod_args`` elements it reads, one score at
a time: the per-element step of the backward's ``mod_args`` gradients.

For one score ``s`` at ``(b, h, q_idx, kv_idx)`` with upstream gradient ``ds`` (d loss / d the
mod's output), ``arg_grad`` adds ``ds * d score_mod / d theta_f`` into ``acc[f]`` for every
element ``theta_f`` of the marked ``mod_args`` that the mod reads. It evaluates the mod once on
recorded gathers (``engine.kernels.gather_recorder``) to learn which flat indices it reads, then
once per distinct index with that element given an imaginary step (complex-step
differentiation). The marked arrays share one flat index space: array ``m`` starts at
``offsets[m]`` (the caller's accumulator holds them end to end).

The function is generated per (mod, marks): its ``mod_args`` tuple is rebuilt with recorders in
the marked places, which Numba needs spelled out at compile time.
"""

from numba import njit

from .gather_recorder import PyGatherRecorder, recorder
from .score_grad import _INV_STEP
from .specialise import cache_tag, named

__all__ = ["no_arg_grad", "arg_grad_kernel", "arg_grad_python", "READS_CAPACITY"]

#: the most reads of marked elements one score_mod evaluation may make (the recording buffer)
READS_CAPACITY = 128


@njit
def no_arg_grad(ds, score, b, h, q_idx, kv_idx, mod_args, acc, buf, offsets):
    """Nothing to differentiate (no marked mod_args): reads nothing."""
    return 0


_TEMPLATE = """
def arg_grad(ds, score, b, h, q_idx, kv_idx, mod_args, acc, buf, offsets):
    z = complex(score, 0.0)
    buf[0] = 0
    _SCORE_MOD(z, b, h, q_idx, kv_idx, {recording})
    n = buf[0]
    if n > buf.shape[0] - 1:
        return n
    for r in range(n):
        f = buf[1 + r]
        seen = False
        for t in range(r):
            if buf[1 + t] == f:
                seen = True
                break
        if not seen:
            g = _SCORE_MOD(z, b, h, q_idx, kv_idx, {perturbed}).imag * _INV_STEP
            acc[f] += ds * g
    return n
"""

_built: dict = {}


def _args_source(marks, active: str) -> str:
    parts = [
        f"_recorder(mod_args[{i}], buf, offsets[{i}], {active})" if m else f"mod_args[{i}]" for i, m in enumerate(marks)
    ]
    return ", ".join(parts) + ("," if len(parts) == 1 else "")


def arg_grad_kernel(score_mod, marks: tuple):
    """The compiled ``arg_grad(ds, score, b, h, q_idx, kv_idx, mod_args, acc, buf, offsets) -> reads`` for
    this mod (a ``numba.njit`` dispatcher) and marks (one bool per ``mod_args`` entry, True for
    the float arrays that take a gradient), memoised per process.

    ``acc`` is a float64 vector over the marked arrays' elements end to end, array ``m`` from
    ``offsets[m]`` (int64, one per ``mod_args`` entry), ``buf`` an int64 scratch of
    ``READS_CAPACITY + 1``. Returns how many marked elements the mod read;
    more than ``READS_CAPACITY`` means nothing was added (the caller raises)."""
    key = (score_mod, marks)
    fn = _built.get(key)
    if fn is None:
        src = _TEMPLATE.format(
            recording="*(" + _args_source(marks, "-1") + ")",
            perturbed="*(" + _args_source(marks, "f") + ")",
        )
        # this module's name: cache_tag then lets a kernel over a built-in mod be disk-cached
        env = {"__name__": __name__, "_SCORE_MOD": score_mod, "_recorder": recorder, "_INV_STEP": _INV_STEP}
        code = compile(src, f"<arg_grad {''.join('1' if m else '0' for m in marks)}>", "exec")
        namespace: dict = {}
        exec(code, env, namespace)
        tag = cache_tag(score_mod)
        mark = "".join("1" if m else "0" for m in marks)
        fn = named(namespace["arg_grad"].__code__, env, "arg_grad", f"{tag}_{mark}" if tag else None)
        fn = _built[key] = njit(error_model="numpy")(fn)
    return fn


def arg_grad_python(score_mod, marks: tuple, offsets: tuple):
    """The same step evaluated by Python on the mod's Python function (the ``reference`` backend's):
    ``grad(ds, score, b, h, q_idx, kv_idx, mod_args, acc)`` adds into ``acc`` (float64)."""
    fn = getattr(score_mod, "py_func", score_mod)

    def wrapped(mod_args, reads, active):
        return tuple(
            PyGatherRecorder(a, offsets[i], reads, active) if m else a for i, (a, m) in enumerate(zip(mod_args, marks))
        )

    def grad(ds, score, b, h, q_idx, kv_idx, mod_args, acc):
        z = complex(score, 0.0)
        reads: list = []
        fn(z, b, h, q_idx, kv_idx, *wrapped(mod_args, reads, None))
        for f in dict.fromkeys(reads):  # distinct, in reading order
            g = complex(fn(z, b, h, q_idx, kv_idx, *wrapped(mod_args, reads, f))).imag * _INV_STEP
            acc[f] += ds * g

    return grad
