"""``attention-engine bench``: compare every variant on every backend, against torch.

The sweep has one *case* per selected variant plus the functional case ``sdpa``
(``engine.scaled_dot_product_attention`` on ``(N, heads, L, head_dim)`` arrays). The cases run one
after the other in a child process (a new one replaces it if it dies), each over every length in
ascending order. At each length the child builds one *implementation* per selected backend plus the
baselines, then

1. calls each once (``first_call_s``: at the first length that uses a kernel, this includes its JIT
   compilation or the loading of Numba's disk cache),
2. checks every output against the baseline's (``max_abs_diff``),
3. measures each call's peak memory: the child resets its own peak resident size
   (``/proc/self/clear_refs``), returns freed heap pages to the system (``malloc_trim``), and
   reports ``VmHWM`` after the call minus ``VmRSS`` before it, so inputs, imports and compiled code
   are not counted while the outputs and every temporary are,
4. times the implementations in alternating rounds (the order rotates each round; ``--repeat``
   rounds, each at least ``MIN_ROUND_S`` long, fewer but at least 3 for slow calls) and keeps the
   median.

An implementation whose next length is predicted (quadratically, from the last one) to take over
``--max-call-s`` per call is skipped from there on, with a row that says so.

Baselines, run with the same thread count as the engine: ``torch.nn.MultiheadAttention`` loaded
with the variant's own weights for the variant cases (the benchmark checks that its output
matches; a variant without an output projection gets an identity ``out_proj``) and
``torch.nn.functional.scaled_dot_product_attention`` for ``sdpa``. Without torch the baselines are
the variant on the ``reference`` backend and plain NumPy. ``sdpa`` also has a plain-NumPy row that
materialises the float32 score matrix.

The building blocks (``numpy_sdpa``, ``torch_mha_like``, ``variant_flop`` ...) are reused by the
pytest-benchmark suite in ``bench/``.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import numpy as np

__all__ = ["add_arguments", "run", "numpy_sdpa", "torch_mha_like", "torch_mha_forward",
           "variant_flop", "sdpa_flop", "available_backends", "machine_info", "device_synchronizer",
           "as_torch_inputs", "format_table", "write_plot", "predicted_skip", "DEFAULT_LENGTHS",
           "FULL_LENGTHS"]

DEFAULT_LENGTHS = (256, 512, 1024)
FULL_LENGTHS = (128, 256, 512, 1024, 2048, 4096)
SDPA_CASE = "sdpa"
#: a timing round lasts at least this long (calls are repeated within a round to reach it)
MIN_ROUND_S = 0.02
#: an implementation whose rounds would take longer than this in all gets fewer of them (>= 3)
ROUNDS_BUDGET_S = 2.0
_MARK = "@@attention-engine-bench "
#: multiplies every duration the child measures: ``ATTENTION_BENCH_SLOWDOWN=1000`` makes this
#: machine look 1000x slower to the benchmark's own decisions (the skip predictor, round counts),
#: which is how the tests prove that their outcome does not depend on the machine's speed
_SLOWDOWN_ENV = "ATTENTION_BENCH_SLOWDOWN"


def _clock_scale() -> float:
    value = os.environ.get(_SLOWDOWN_ENV, "1")
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"{_SLOWDOWN_ENV} must be a positive number, got {value!r}") from None
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{_SLOWDOWN_ENV} must be a positive number, got {value!r}")
    return scale


def predicted_skip(time_s: float, L: int, next_L: int, max_call_s: float) -> str | None:
    """Why an implementation that took ``time_s`` per call at length ``L`` is not run at
    ``next_L``, or None to run it: the call is predicted to grow with the square of the length
    (the materialising paths are quadratic) and skipped over ``max_call_s``. ``max_call_s`` of 0
    or inf never skips."""
    if not max_call_s or math.isinf(max_call_s):
        return None
    predicted = time_s * (next_L / L) ** 2
    if predicted <= max_call_s:
        return None
    return (f"skipped: {time_s:.2g} s per call at L={L} predicts {predicted:.2g} s here "
            f"(over --max-call-s {max_call_s:g})")


# ------------------------------------------------------------------------------------------------
# building blocks (also used by bench/)
# ------------------------------------------------------------------------------------------------
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
        mha = torch.nn.MultiheadAttention(E, H, bias="in_proj_bias" in state, batch_first=True,
                                          kdim=getattr(variant, "kdim", E), vdim=getattr(variant, "vdim", E),
                                          dtype=torch.float64 if variant.dtype == np.float64 else torch.float32)
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

    return {n: torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
            for n, x in inputs.items()}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, core counts, load average (1, 5, 15 min), OS, Python and library versions, and
    the date (UTC)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "load_average": load,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("attention-engine", "numpy", "numba", "torch", "scipy")},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------
# measurement, in the child process
# ------------------------------------------------------------------------------------------------
def _status_kib() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def _peak_probe() -> str:
    """How this process measures a call's peak memory: ``clear_refs`` (exact) or ``ru_maxrss``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib()
        return "clear_refs"
    except OSError:
        return "ru_maxrss"


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_bytes(fn: Callable, method: str) -> int:
    """Peak resident memory a call adds to this process, in bytes.

    With ``clear_refs`` it is exact up to page granularity; with ``ru_maxrss`` (no ``/proc``) it is
    a lower bound (0 when an earlier peak of the process was higher).
    """
    gc.collect()
    _malloc_trim()  # freed heap pages would otherwise be reused without showing in the RSS
    if method == "clear_refs":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib()["VmRSS"]
        result = fn()
        peak = _status_kib()["VmHWM"]
        del result
        return max(0, peak - before) * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del result
    return max(0, peak - before) * scale


@dataclass
class _Impl:
    """One row being measured: ``fn()`` returns the output as a NumPy array."""

    impl: str
    backend: str | None
    fn: Callable
    baseline: bool = False
    error: str | None = None
    unsupported: bool = False  # the backend refused the inputs
    skipped: bool = False  # not run: --max-call-s
    first_call_s: float | None = None
    peak_bytes: int | None = None
    loops: int = 1
    rounds: int = 0
    times: list = field(default_factory=list)
    out: np.ndarray | None = None
    max_abs_diff: float | None = None


def _emit(stream, **msg) -> None:
    stream.write(_MARK + json.dumps(msg) + "\n")
    stream.flush()


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


def _timed_fn(call: Callable, backend: str | None) -> Callable:
    sync = device_synchronizer(backend)

    def fn():
        out = call()
        sync()
        return out
    return fn


class _VariantCase:
    """The implementations of one variant at each length: one per backend, plus the torch layer."""

    def __init__(self, name: str, spec: dict, torch_ok: bool):
        from .plugins import get_variant, variant_info

        cls = variant_info()[0][name].cls
        params = cls.example_params(spec["embed_dim"], spec["heads"])
        try:
            self.variant = get_variant(name, **params, seed=0)
        except TypeError:  # a plugin whose constructor takes no seed
            self.variant = get_variant(name, **params)
        self.name, self.spec = name, spec
        self.torch_mha, self.torch_note = (None, "torch is not installed")
        if torch_ok:
            self.torch_mha, self.torch_note = torch_mha_like(self.variant)
        self.causal: bool | None = None  # decided at the first length by comparing outputs
        self.mismatch_noted = False

    def build(self, L: int) -> tuple[list[_Impl], int, dict]:
        spec, variant = self.spec, self.variant
        inputs = variant.example_inputs(spec["batch"], L, rng=L)
        impls = []
        for b in spec["backends"]:
            impls.append(_Impl(b, b, _timed_fn(lambda b=b: variant(**inputs, backend=b)[0], b)))
        if self.torch_mha is not None:
            tin = as_torch_inputs(inputs)
            impls.append(_Impl("torch-mha", None, lambda: torch_mha_forward(
                self.torch_mha, tin, bool(self.causal)).numpy(), baseline=True))
        elif "reference" in spec["backends"]:
            next(i for i in impls if i.impl == "reference").baseline = True
        elif impls:
            impls[0].baseline = True
        shape = {"batch": spec["batch"], "L": L, "S": L, "embed_dim": getattr(variant, "embed_dim", None),
                 "heads": getattr(variant, "num_heads", None), "dtype": np.dtype(variant.dtype).name}
        return impls, variant_flop(variant, inputs), shape

    def check_baseline(self, impls: list[_Impl]) -> str | None:
        """Pick causal or not for the torch layer so that it matches the engine (at the first
        length); a note when it does not match, at the first length where it does not."""
        base = next((i for i in impls if i.impl == "torch-mha"), None)
        ref = next((i for i in impls if not i.baseline and i.out is not None), None)
        if base is None or base.out is None or ref is None or self.mismatch_noted:
            return None
        if _close(base.out, ref.out):
            self.causal = bool(self.causal)
            return None
        if self.causal is None:  # first length: try the causal mask before giving up
            self.causal = True
            base.out = base.fn()
            if _close(base.out, ref.out):
                return None
            self.causal = False
            base.out = base.fn()
        self.mismatch_noted = True
        L = ref.out.shape[-2]
        return (f"from L={L}, torch.nn.MultiheadAttention loaded with the same weights does not reproduce "
                "its output (with or without a causal mask), so it is timed only as a layer of the same "
                "size; max|diff| shows by how much they differ")


class _SdpaCase:
    """``engine.scaled_dot_product_attention`` per backend, plain NumPy, and torch SDPA."""

    def __init__(self, spec: dict, torch_ok: bool):
        self.spec, self.torch_ok = spec, torch_ok
        if spec["embed_dim"] % spec["heads"]:
            raise ValueError(f"embed_dim ({spec['embed_dim']}) must be divisible by heads ({spec['heads']})")
        self.head_dim = spec["embed_dim"] // spec["heads"]

    def build(self, L: int):
        import engine

        spec = self.spec
        rng = np.random.default_rng(L)
        shape4 = (spec["batch"], spec["heads"], L, self.head_dim)
        q, k, v = (rng.standard_normal(shape4).astype(np.float32) for _ in range(3))
        impls = []
        for b in spec["backends"]:
            impls.append(_Impl(b, b, _timed_fn(
                lambda b=b: engine.scaled_dot_product_attention(q, k, v, backend=b), b)))
        impls.append(_Impl("numpy", None, lambda: numpy_sdpa(q, k, v), baseline=not self.torch_ok))
        if self.torch_ok:
            import torch
            import torch.nn.functional as F

            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

            def torch_sdpa():
                with torch.inference_mode():
                    return F.scaled_dot_product_attention(tq, tk, tv).numpy()
            impls.append(_Impl("torch-sdpa", None, torch_sdpa, baseline=True))
        shape = {"batch": spec["batch"], "L": L, "S": L, "embed_dim": spec["embed_dim"],
                 "heads": spec["heads"], "head_dim": self.head_dim, "dtype": "float32"}
        return impls, sdpa_flop(spec["batch"], spec["heads"], L, L, self.head_dim), shape

    def check_baseline(self, impls):
        return None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-3, atol=1e-4))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:297] + "..."


def _measure_length(case, L: int, spec: dict, peak_method: str, status,
                    too_slow: dict) -> tuple[list[dict], str | None]:
    """Measure every implementation of ``case`` at length ``L`` except those in ``too_slow``
    (name -> why), which get a row saying why."""
    impls, flop, shape = case.build(L)
    scale = _clock_scale()
    for impl in impls:  # 1. first call: compilation, cache loading, lazy initialisation
        if impl.impl in too_slow:
            impl.error, impl.skipped = too_slow[impl.impl], True
            continue
        status(f"L={L} first call {impl.impl}")
        try:
            t0 = time.perf_counter()
            impl.out = np.asarray(impl.fn())
            impl.first_call_s = (time.perf_counter() - t0) * scale
        except ValueError as exc:
            impl.unsupported = "cannot run these inputs" in str(exc)
            impl.error = str(exc) if impl.unsupported else _describe(exc)
        except Exception as exc:
            impl.error = _describe(exc)
    note = case.check_baseline(impls)
    base = next((i for i in impls if i.baseline), None)
    for impl in impls:  # 2. agreement with the baseline, then drop the outputs before measuring memory
        if base is not None and base.out is not None and impl.out is not None:
            impl.max_abs_diff = float(np.max(np.abs(impl.out.astype(np.float64) - base.out))) \
                if impl.out.shape == base.out.shape else math.inf
    for impl in impls:
        impl.out = None
    ok = [i for i in impls if i.error is None]
    for impl in ok:  # 3. peak memory of a warm call; it also gives the time for choosing loops
        status(f"L={L} memory {impl.impl}")
        try:
            t0 = time.perf_counter()
            impl.peak_bytes = _peak_bytes(impl.fn, peak_method)
            warm = (time.perf_counter() - t0) * scale
            impl.loops = max(1, math.ceil(MIN_ROUND_S / max(warm, 1e-7)))
            # slow calls get fewer rounds (never fewer than 3 when --repeat allows): see ROUNDS_BUDGET_S
            impl.rounds = max(min(3, spec["repeat"]),
                              min(spec["repeat"], int(ROUNDS_BUDGET_S / (impl.loops * max(warm, 1e-7)))))
        except Exception as exc:
            impl.error = _describe(exc)
    ok = [i for i in ok if i.error is None]
    status(f"L={L} timing {len(ok)} implementations x {spec['repeat']} rounds")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:  # 4. alternating rounds, the order rotating, so drift hits every implementation alike
        for r in range(spec["repeat"] if ok else 0):
            for impl in ok[r % len(ok):] + ok[:r % len(ok)]:
                if r >= impl.rounds:
                    continue
                t0 = time.perf_counter()
                for _ in range(impl.loops):
                    impl.fn()
                impl.times.append((time.perf_counter() - t0) * scale / impl.loops)
    finally:
        if gc_was_enabled:
            gc.enable()
    rows = []
    for impl in impls:
        t = float(np.median(impl.times)) if impl.times else None
        rows.append({"case": spec["case"], "kind": "functional" if spec["case"] == SDPA_CASE else "variant",
                     "impl": impl.impl, "backend": impl.backend, "baseline": impl.baseline, **shape,
                     "flop": flop, "time_s": t, "times_s": impl.times, "loops": impl.loops,
                     "gflops": flop / t / 1e9 if t else None, "peak_bytes": impl.peak_bytes,
                     "peak_method": peak_method, "first_call_s": impl.first_call_s,
                     "max_abs_diff": impl.max_abs_diff, "error": impl.error,
                     "unsupported": impl.unsupported, "skipped": impl.skipped,
                     **({"torch_causal": case.causal} if impl.impl == "torch-mha" else {})})
    return rows, note


def _register_worker_plugins(plugins) -> list[str]:
    import importlib

    import engine

    problems = []
    for name, target in plugins:
        try:
            module, _, attr = target.partition(":")
            obj = importlib.import_module(module)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
            engine.register_plugin(obj, name=name)
        except Exception as exc:
            problems.append(f"plugin {name!r} ({target}): {_describe(exc)}")
    return problems


def _run_spec(spec: dict, out, state: dict) -> None:
    """Measure one case in this child, reporting on ``out``."""
    import engine

    if "threads" not in state:  # the first case: settings shared by every case of the run
        for problem in _register_worker_plugins(spec.get("plugins", [])):
            _emit(out, type="warning", message=problem)
        engine.set_num_threads(spec["threads"])
        state["threads"], state["torch_ok"] = spec["threads"], False
        if not spec.get("no_torch"):
            try:
                import torch

                torch.set_num_threads(spec["threads"])
                state["torch_ok"] = True
            except ImportError:
                pass
        state["peak_method"] = _peak_probe()
    torch_ok = state["torch_ok"]
    try:
        case = _SdpaCase(spec, torch_ok) if spec["case"] == SDPA_CASE else _VariantCase(spec["case"], spec, torch_ok)
    except Exception as exc:
        _emit(out, type="case_error", error=_describe(exc))
        return
    if spec["case"] != SDPA_CASE and case.torch_mha is None:
        _emit(out, type="note", message=f"{spec['case']}: no torch baseline ({case.torch_note})")
    too_slow: dict = {}
    lengths = spec["lengths"]
    for n, L in enumerate(lengths):
        rows, note = _measure_length(case, L, spec, state["peak_method"],
                                     lambda m: _emit(out, type="status", message=m), too_slow)
        if note:
            _emit(out, type="note", message=f"{spec['case']}: {note}")
        _emit(out, type="rows", L=L, rows=rows)
        for row in rows:  # a call that would exceed --max-call-s at the next length is not made
            if n + 1 < len(lengths) and row["time_s"] and row["impl"] not in too_slow:
                why = predicted_skip(row["time_s"], L, lengths[n + 1], spec["max_call_s"])
                if why:
                    too_slow[row["impl"]] = why
    info = {"engine_threads": engine.get_num_threads(), "torch_threads": None}
    try:
        import numba

        info["numba_threading_layer"] = numba.threading_layer()
    except (ValueError, ImportError):
        info["numba_threading_layer"] = None
    if torch_ok:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    _emit(out, type="done", info=info)


def _worker_main() -> None:
    """Entry point of the child: reads case specs (JSON, one a line) on stdin, reports on stdout."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the report stream
    state: dict = {}
    for line in sys.stdin:
        if line.strip():
            _run_spec(json.loads(line), out, state)


# ------------------------------------------------------------------------------------------------
# the command, in the parent process
# ------------------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lengths(text: str) -> list[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return sorted(set(values))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=None, metavar="NAMES",
                        help="comma-separated variant names (default: every registered variant; 'none' for none)")
    parser.add_argument("--backends", default=None, metavar="NAMES",
                        help="comma-separated backend names (default: every backend available here)")
    parser.add_argument("--lengths", type=_lengths, default=None, metavar="L1,L2,...",
                        help=f"sequence lengths (default {','.join(map(str, DEFAULT_LENGTHS))}; "
                             f"with --full {','.join(map(str, FULL_LENGTHS))})")
    parser.add_argument("--full", action="store_true", help="the whole grid of lengths (minutes)")
    parser.add_argument("--batch", type=_positive, default=2, help="batch size N (default 2)")
    parser.add_argument("--embed-dim", type=_positive, default=256, help="embed_dim E (default 256)")
    parser.add_argument("--heads", type=_positive, default=4, help="attention heads (default 4: head_dim 64)")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="threads for the engine, NumPy's BLAS and torch alike (default: all cores)")
    parser.add_argument("--repeat", type=_positive, default=5, help="timing rounds; the median is kept (default 5)")
    parser.add_argument("--no-functional", action="store_true",
                        help="leave out the functional rows (scaled_dot_product_attention, NumPy, torch SDPA)")
    parser.add_argument("--no-torch", action="store_true",
                        help="do not use torch even if installed (baselines become NumPy)")
    parser.add_argument("--json", metavar="PATH", help="write every row and the machine's description as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: time and peak memory against L (log-log)")
    parser.add_argument("--max-call-s", type=float, default=None, metavar="SECONDS",
                        help="skip an implementation at the lengths where one call would take longer, "
                             "predicted quadratically from the previous length (default 1; 5 with --full; "
                             "0 or inf: never skip)")
    parser.add_argument("--timeout", type=_positive, default=1800,
                        help="seconds one case (all its lengths) may take before it is stopped (default 1800)")


def _runtime_plugins() -> tuple[list[tuple[str, str]], list[str]]:
    """Plugins registered with ``engine.register_plugin`` in this process, as importable targets."""
    from importlib.metadata import entry_points

    from . import hookspecs
    from .plugins import BUILTIN_PLUGINS, get_plugin_manager

    installed = {ep.name for ep in entry_points(group=hookspecs.PROJECT)} | set(BUILTIN_PLUGINS)
    targets, problems = [], []
    for name, plugin in get_plugin_manager().list_name_plugin():
        if name in installed or plugin is None:
            continue
        if isinstance(plugin, type(sys)):
            target = plugin.__name__
        else:
            module = sys.modules.get(getattr(type(plugin), "__module__", ""))
            attr = next((a for a, v in vars(module).items() if v is plugin), None) if module else None
            if isinstance(plugin, type):
                module, attr = sys.modules.get(plugin.__module__), plugin.__qualname__
            target = f"{module.__name__}:{attr}" if module is not None and attr else None
        if target is None or target.split(":")[0] == "__main__":
            problems.append(f"plugin {name!r} was registered at run time from an object the benchmark's "
                            "child processes cannot import; its variants are skipped")
            continue
        targets.append((name, target))
    return targets, problems


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc:<44.44} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}]")
        except ImportError:
            self._bar = None
        self.total, self.n, self.desc = total, 0, ""

    def describe(self, case: str, message: str) -> None:
        self.desc = f"{case}: {message}"
        if self._bar is not None:
            self._bar.set_description_str(self.desc)

    def advance(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            width = 30
            done = int(width * self.n / max(1, self.total))
            print(f"[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {self.desc}",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Worker:
    """The child process that measures the cases one after the other.

    One process serves the whole run, so its imports (torch's take seconds) are paid once; if it
    dies (out of memory, ``--timeout``), the case it was running gets error rows and a new child
    takes the next case.
    """

    def __init__(self, threads: int):
        self.env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            self.env[var] = str(threads)
        # the child imports what this process can (plugins registered at run time, from their modules)
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            p for p in sys.path + self.env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isdir(p)))
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from engine.benchmark import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=self.env, text=True)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None
        self.err.close()

    def run_case(self, spec: dict, progress: _Progress, timeout: int) -> tuple[list[dict], list[str], dict]:
        """Rows, notes and run info of one case; lengths it never reached get rows with the error."""
        if self.proc is None:
            self._start()
        proc = self.proc
        err_start = self.err.seek(0, os.SEEK_END)
        rows, notes, info, failure = [], [], {}, None
        pending = list(spec["lengths"])
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            proc.kill()
        timer = threading.Timer(timeout, stop)
        timer.start()
        finished = False
        try:
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                if not line.startswith(_MARK):
                    continue
                msg = json.loads(line[len(_MARK):])
                if msg["type"] == "status":
                    progress.describe(spec["case"], msg["message"])
                elif msg["type"] == "rows":
                    rows.extend(msg["rows"])
                    pending.remove(msg["L"])
                    progress.advance()
                elif msg["type"] in ("note", "warning"):
                    notes.append(msg["message"])
                elif msg["type"] in ("case_error", "done"):
                    failure = msg.get("error")
                    info = msg.get("info", {})
                    finished = True
                    break
        except (BrokenPipeError, OSError):
            pass
        finally:
            timer.cancel()
        if not finished:  # the child died: report why, and start a new one for the next case
            rc = proc.wait()
            self.proc = None
            self.err.seek(err_start)
            tail = " | ".join(self.err.read().strip().splitlines()[-3:])
            how = f"stopped after --timeout {timeout} s" if timed_out.is_set() else f"exit status {rc}"
            failure = f"the benchmark's child process died ({how}){': ' + tail if tail else ''}"
        for L in pending:
            rows.append({"case": spec["case"], "impl": "*", "L": L, "error": failure})
            progress.advance()
        return rows, notes, info


def _fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt_bytes(b):
    if b is None:
        return "-"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def format_table(rows: list[dict]) -> str:
    """The results as an aligned text table, one row per (case, L, implementation).

    A row that could not be measured shows its error (or the backend's refusal) in place of the
    figures.
    """
    header = ("case", "impl", "L", "time", "GFLOP/s", "peak mem", "1st call", "t/base", "max|diff|")
    lines = []
    for r in rows:
        if r.get("time_s") is None:
            error = str(r.get("error"))
            what = "" if r.get("skipped") else "unsupported: " if r.get("unsupported") else "error: "
            lines.append((r["case"], r["impl"], str(r["L"]), what + error))
            continue
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        if r.get("baseline"):
            ratio += " (base)"
        diff = "-" if r.get("max_abs_diff") is None or r.get("baseline") else f"{r['max_abs_diff']:.0e}"
        lines.append((r["case"], r["impl"], str(r["L"]), _fmt_time(r["time_s"]),
                      "-" if r["gflops"] is None else f"{r['gflops']:.1f}", _fmt_bytes(r["peak_bytes"]),
                      _fmt_time(r["first_call_s"]), ratio, diff))
    full = [x for x in (header, *lines) if len(x) == len(header)]
    widths = [max(len(x[i]) for x in full + [x[:3] for x in lines if len(x) < len(header)] if i < len(x))
              for i in range(len(header))]
    right = {2, 3, 4, 5, 6}
    out = []
    for n, line in enumerate((header, *lines)):
        cells = [c.rjust(w) if i in right and len(line) == len(header) else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        if len(line) < len(header):  # an error: its message runs on past the columns
            cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line[:3], widths))]
            cells.append(line[3])
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _add_ratios(rows: list[dict]) -> None:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["case"], r["L"]), []).append(r)
    for group in groups.values():
        base = next((r for r in group if r.get("baseline") and r.get("time_s")), None)
        for r in group:
            r["baseline_impl"] = base["impl"] if base else None
            r["ratio"] = r["time_s"] / base["time_s"] if base and r.get("time_s") else None


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """Time and peak memory against L on log-log axes, one line per case/implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    for r in rows:
        if r.get("time_s"):
            series.setdefault((r["case"], r["impl"]), []).append(r)
    cases = sorted({c for c, _ in series})
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cases)}
    # line style and marker say which implementation, colour which case
    known = {"cpu": ("-", "o"), "reference": (":", "s"), "numpy": ("--", "D"), "torch-mha": ("-.", "^"),
             "torch-sdpa": ("-.", "^")}
    others = [((0, (5, 1)), "v"), ((0, (3, 1, 1, 1)), "P"), ((0, (1, 1)), "X")]
    impls = sorted({i for _, i in series if i not in known})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 6))
    for (case, impl), pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r["L"])
        ls, marker = known.get(impl) or others[impls.index(impl) % len(others)]
        style = dict(color=colours[case], linestyle=ls, marker=marker, ms=4)
        ax_t.plot([r["L"] for r in pts], [r["time_s"] for r in pts], label=f"{case} / {impl}", **style)
        mem = [(r["L"], r["peak_bytes"] / 2**20) for r in pts if r.get("peak_bytes")]
        if mem:
            ax_m.plot(*zip(*mem), **style)
    for ax, ylabel in ((ax_t, "median time per call (s)"), (ax_m, "peak memory of a call (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    lengths = sorted({r["L"] for r in rows if r.get("peak_bytes")})
    if len(lengths) > 1:  # guides: what linear and quadratic growth look like
        ys = [r["peak_bytes"] / 2**20 for r in rows if r.get("peak_bytes")]
        y0, l0 = float(np.median(ys)), lengths[0]
        ax_m.plot(lengths, [y0 * L / l0 for L in lengths], color="grey", lw=0.8, ls="--", label="∝ L")
        ax_m.plot(lengths, [y0 * (L / l0) ** 2 for L in lengths], color="grey", lw=0.8, ls=":", label="∝ L²")
        ax_m.legend(loc="upper left", fontsize=8)
    ax_t.set_title("time")
    ax_m.set_title("peak memory")
    fig.legend(*ax_t.get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strict_json(value):
    """``value`` with non-finite floats (a NaN difference, say) written as strings, so the file is
    standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def run(args) -> int:
    import engine

    started = time.perf_counter()
    machine_before = machine_info()
    registered = engine.list_variants()
    if args.variants is None:
        variants = registered
    elif args.variants.strip().lower() == "none":
        variants = []
    else:
        variants = _csv(args.variants)
        unknown = [v for v in variants if v not in registered]
        if unknown:
            print(f"attention-engine bench: error: unknown variant(s) {', '.join(unknown)}; "
                  f"available: {', '.join(registered)}", file=sys.stderr)
            return 2
    skipped = []
    if args.backends is None:
        backends = available_backends()
    else:
        backends = []
        for name in _csv(args.backends):
            if name not in engine.list_backends():
                print(f"attention-engine bench: error: unknown backend {name!r}; available: "
                      f"{', '.join(engine.list_backends())}", file=sys.stderr)
                return 2
            why = engine.get_backend(name).unavailable_reason()
            if why:
                skipped.append(f"backend {name!r} skipped: {why}")
            else:
                backends.append(name)
    if args.embed_dim % args.heads:
        print(f"attention-engine bench: error: --embed-dim ({args.embed_dim}) must be divisible by "
              f"--heads ({args.heads})", file=sys.stderr)
        return 2
    lengths = args.lengths or list(FULL_LENGTHS if args.full else DEFAULT_LENGTHS)
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    plugins, problems = _runtime_plugins()
    skipped += problems
    cases = list(variants) + ([] if args.no_functional else [SDPA_CASE])
    if not cases:
        print("attention-engine bench: error: nothing to run (no variants and --no-functional)", file=sys.stderr)
        return 2
    base = {"lengths": lengths, "batch": args.batch, "embed_dim": args.embed_dim, "heads": args.heads,
            "threads": threads, "repeat": args.repeat, "backends": backends, "plugins": plugins,
            "max_call_s": args.max_call_s if args.max_call_s is not None else (5.0 if args.full else 1.0),
            "no_torch": args.no_torch}
    progress = _Progress(len(cases) * len(lengths))
    rows, notes, info = [], [], {}
    worker = _Worker(threads)
    try:
        for case in cases:
            progress.describe(case, "starting")
            case_rows, case_notes, case_info = worker.run_case({**base, "case": case}, progress, args.timeout)
            rows += case_rows
            notes += case_notes
            info = info or case_info
    finally:
        worker.close()
        progress.close()
    _add_ratios(rows)
    order = {c: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: (order[r["case"]], r["L"], not r.get("backend"), r.get("baseline", False)))
    elapsed = time.perf_counter() - started
    config = {**{k: v for k, v in base.items() if k != "plugins"}, "variants": variants,
              "functional": not args.no_functional, **info}
    machine = {**machine_before, "load_average_after": machine_info()["load_average"]}
    print(format_table(rows))
    print(f"\nN={args.batch}, E={args.embed_dim}, heads={args.heads} (sdpa: head_dim {args.embed_dim // args.heads}), "
          f"float32, {threads} thread(s) for engine, BLAS and torch; median of {args.repeat} rounds.")
    print("t/base: median time / the baseline's in the same case and L (torch-mha for variants, torch-sdpa "
          "for sdpa; NumPy without torch); below 1 is faster. max|diff|: largest difference from the "
          "baseline's output. 1st call: the first call at this L; the first use of a kernel includes its JIT "
          "compilation (or loading Numba's cache).")
    for line in skipped + notes:
        print("note: " + line)
    print(f"{machine['cpu']}, {machine['usable_cores']} cores, load average {machine['load_average']} before and "
          f"{machine['load_average_after']} after; ran in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_strict_json({"machine": machine, "config": config, "elapsed_s": elapsed,
                                    "notes": skipped + notes, "rows": rows}), f, indent=1, allow_nan=False)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, args.plot, f"attention-engine bench: N={args.batch}, E={args.embed_dim}, "
                   f"heads={args.heads}, {threads} threads; {machine['cpu']}; {machine['date'][:10]}")
        print(f"wrote {args.plot}")
    return 1 if any(r.get("error") and not (r.get("unsupported") or r.get("skipped")) for r in rows) else 0
