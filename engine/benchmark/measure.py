"""Measuring one case at one length, in the benchmark's child process: first call, agreement
with the baseline, peak memory, alternating timed rounds; and the skip predictor."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..runtime.errors import NotSupportedError
from .baselines import (
    as_torch_inputs,
    device_synchronizer,
    numpy_sdpa,
    sdpa_flop,
    torch_mha_forward,
    torch_mha_like,
    variant_flop,
)

__all__ = ["predicted_skip", "SDPA_CASE", "MIN_ROUND_S", "ROUNDS_BUDGET_S"]

SDPA_CASE = "sdpa"


#: a timing round lasts at least this long (calls are repeated within a round to reach it)
MIN_ROUND_S = 0.02


#: an implementation whose rounds would take longer than this in all gets fewer of them (>= 3)
ROUNDS_BUDGET_S = 2.0


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
    return (
        f"skipped: {time_s:.2g} s per call at L={L} predicts {predicted:.2g} s here (over --max-call-s {max_call_s:g})"
    )


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

    With ``clear_refs`` it counts the pages that become resident during the call: exact up to page
    granularity, less the few pages a call may reuse that stayed resident from earlier work
    (``malloc_trim`` returns most freed ones first; 28 KiB of an 8 MiB matrix once, under pytest);
    with ``ru_maxrss`` (no ``/proc``) it is a lower bound (0 when an earlier peak of the process was
    higher).
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
        from ..plugins.registry import get_variant, variant_info

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
            impls.append(
                _Impl(
                    "torch-mha",
                    None,
                    lambda: torch_mha_forward(self.torch_mha, tin, bool(self.causal)).numpy(),
                    baseline=True,
                )
            )
        elif "reference" in spec["backends"]:
            next(i for i in impls if i.impl == "reference").baseline = True
        # else: no baseline in this run (a selected backend is never compared with itself)
        shape = {
            "batch": spec["batch"],
            "L": L,
            "S": L,
            "embed_dim": getattr(variant, "embed_dim", None),
            "heads": getattr(variant, "num_heads", None),
            "dtype": np.dtype(variant.dtype).name,
        }
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
        return (
            f"from L={L}, torch.nn.MultiheadAttention loaded with the same weights does not reproduce "
            "its output (with or without a causal mask), so it is timed only as a layer of the same "
            "size; max|diff| shows by how much they differ"
        )


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
            impls.append(_Impl(b, b, _timed_fn(lambda b=b: engine.scaled_dot_product_attention(q, k, v, backend=b), b)))
        impls.append(_Impl("numpy", None, lambda: numpy_sdpa(q, k, v), baseline=not self.torch_ok))
        if self.torch_ok:
            import torch
            import torch.nn.functional as F

            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

            def torch_sdpa():
                with torch.inference_mode():
                    return F.scaled_dot_product_attention(tq, tk, tv).numpy()

            impls.append(_Impl("torch-sdpa", None, torch_sdpa, baseline=True))
        shape = {
            "batch": spec["batch"],
            "L": L,
            "S": L,
            "embed_dim": spec["embed_dim"],
            "heads": spec["heads"],
            "head_dim": self.head_dim,
            "dtype": "float32",
        }
        return impls, sdpa_flop(spec["batch"], spec["heads"], L, L, self.head_dim), shape

    def check_baseline(self, impls):
        return None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-3, atol=1e-4))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:297] + "..."


def _measure_length(
    case, L: int, spec: dict, peak_method: str, status, too_slow: dict
) -> tuple[list[dict], str | None]:
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
        except NotSupportedError as exc:  # the backend refused the inputs: a row that says why
            impl.unsupported = True
            impl.error = str(exc)
        except Exception as exc:
            impl.error = _describe(exc)
    note = case.check_baseline(impls)
    base = next((i for i in impls if i.baseline), None)
    for impl in impls:  # 2. agreement with the baseline, then drop the outputs before measuring memory
        if base is not None and base.out is not None and impl.out is not None:
            impl.max_abs_diff = (
                float(np.max(np.abs(impl.out.astype(np.float64) - base.out)))
                if impl.out.shape == base.out.shape
                else math.inf
            )
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
            impl.rounds = max(
                min(3, spec["repeat"]), min(spec["repeat"], int(ROUNDS_BUDGET_S / (impl.loops * max(warm, 1e-7))))
            )
        except Exception as exc:
            impl.error = _describe(exc)
    ok = [i for i in ok if i.error is None]
    status(f"L={L} timing {len(ok)} implementations x {spec['repeat']} rounds")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:  # 4. alternating rounds, the order rotating, so drift hits every implementation alike
        for r in range(spec["repeat"] if ok else 0):
            for impl in ok[r % len(ok) :] + ok[: r % len(ok)]:
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
        rows.append(
            {
                "case": spec["case"],
                "kind": "functional" if spec["case"] == SDPA_CASE else "variant",
                "impl": impl.impl,
                "backend": impl.backend,
                "baseline": impl.baseline,
                **shape,
                "flop": flop,
                "time_s": t,
                "times_s": impl.times,
                "loops": impl.loops,
                "gflops": flop / t / 1e9 if t else None,
                "peak_bytes": impl.peak_bytes,
                "peak_method": peak_method,
                "first_call_s": impl.first_call_s,
                "max_abs_diff": impl.max_abs_diff,
                "error": impl.error,
                "unsupported": impl.unsupported,
                "skipped": impl.skipped,
                **({"torch_causal": case.causal} if impl.impl == "torch-mha" else {}),
            }
        )
    return rows, note
