"""Measuring the ``cpu`` forward kernel's GEMM provider and tiles on this machine (kept by
``engine.runtime.tuning``; the rule without measurement is ``engine.backends.cpu.tiles``).

What is measured, and how:

* **The GEMM provider, per dtype and head-width class** (float32, float64; heads up to 64, and
  wider ones measured at 128): every installed provider (``numpy``, ``openblas``, ``mkl`` with its
  generated GEMMs) has its tiles searched (as below) on the class's medium problem; the provider
  with the fastest best wins, except that ``numpy`` (or ``openblas`` where at least as fast as
  it) is kept within ``GEMM_CALIBRATION_MARGIN`` of it, and the engine's own ``fma`` only wins
  by more than that margin over every library (``gemm_providers.choose_fastest``).
  Heads of 65 to 128 measure the second class; wider heads take its choice. The two widths are
  measured apart because the winner can differ: on an AMD Zen 4 SciPy's OpenBLAS 0.3.30 and
  ``scipy-openblas32`` 0.3.34 tied at head 64 (6.65 against 6.47 ms) while the newer one was 3-6%
  faster at head 128 (11.74-11.88 against 12.10-12.63 ms). The backward uses the forward's
  provider (``get_gemm_provider`` with the same width).
* **The order the decode kernel reads a cache in, per dtype** (float32, float64): the GEMV kernel
  (``engine.kernels.cpu.decode_gemv``) on one query row per head of a cache larger than most L3
  caches (:data:`DECODE_ORDER_PROBLEM`), its four- and eight-row interleaved passes against one
  row at a time in address order; the faster one is kept (interleaved, today's rule, when tuning
  is off). Once per machine and dtype, on the first call that takes the kernel: 128 MiB of cache
  for the moment it runs and 0.3-0.6 s on a warm Numba cache (allocating it, eight calls of the
  kernel's serial build), plus that build's compile on a cold one (seconds; small decode calls use
  it anyway).
* **The tiles, per class** (provider, dtype, head width up to 64 / 128, query length short /
  medium / long: ``tiles.tile_class``): every (block_q, block_k) of ``tiles.BLOCK_Q_CHOICES`` x
  ``tiles.BLOCK_K_CHOICES`` with 256 query rows per task, then the winner with other rows per
  task, on the class's problem (L = S = 512; L = S = 1024; 512 queries against 4096 keys).

Each candidate is one call of the kernel's serial build (no thread pool, so the result is the
per-core speed, and the thread's CPU time measures it: time the process spends descheduled by
other work on a shared machine does not count), on random inputs sized to take a few
milliseconds; candidates alternate over :data:`ROUNDS` rounds and each one's fastest round counts
(interference only adds time). A class costs about 0.2-0.5 s, the provider about 1 s, once per
machine and library versions.
"""

from __future__ import annotations

import datetime
import time

import numpy as np

from ...problems.base import dtype_name
from ...runtime.config import DECODE_BLOCK_K, GEMM_CALIBRATION_CANDIDATES
from ...runtime.gemm_providers import (
    OWN_TILES,
    choose_fastest,
    load_provider,
    provider_key,
    valid_provider_choice,
    width_class,
)
from ...runtime.tuning import remember, tuned
from .tiles import BLOCK_K_CHOICES, BLOCK_Q_CHOICES, TASK_ROWS_CHOICES, TilePlan, tile_key, valid_tiles

__all__ = ["tune_provider", "tune_tiles", "tune_decode_order", "DECODE_ORDER_PROBLEM", "CLASS_PROBLEMS", "ROUNDS"]

#: timed rounds per candidate (after one untimed call)
ROUNDS = 3
#: the problem each length class is measured on: (heads, L, S)
CLASS_PROBLEMS = {"short": (4, 512, 512), "medium": (2, 1024, 1024), "long": (1, 512, 4096)}


def _inputs(dtype: np.dtype, heads: int, L: int, S: int, width: int):
    rng = np.random.default_rng(0)
    shape = ((1, heads, L, width), (1, heads, S, width), (1, heads, S, width))
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shape]


def _timer(forward, dtype: np.dtype, width: int, length: str, provider=None, amx=True):
    """A function timing one serial kernel call at (block_q, block_k, task_rows) in seconds of
    this thread's CPU time; ``forward`` is the forward op's ``run``."""
    from ...problems.attention import validate_attention_args

    heads, L, S = CLASS_PROBLEMS[length]
    q, k, v = _inputs(dtype, heads, L, S, width)
    problem = validate_attention_args(q, k, v)

    def run(block_q: int, block_k: int, rows: int) -> float:
        plan = TilePlan(min(block_q, L), block_k, max(1, rows // block_q), True)
        t = time.thread_time()
        forward(problem, plan=plan, provider=provider, serial=True, amx=amx)
        return time.thread_time() - t

    return run


def _measure(run, candidates) -> dict:
    """Seconds per candidate: the least over :data:`ROUNDS` rounds (other work on the machine only
    ever adds time), the order rotating each round."""
    for c in candidates:
        run(*c)  # untimed: first-call costs (generated GEMMs, page faults)
    times = {c: [] for c in candidates}
    for r in range(ROUNDS):
        shift = r * len(candidates) // ROUNDS
        for c in candidates[shift:] + candidates[:shift]:
            times[c].append(run(*c))
    return {c: min(t) for c, t in times.items()}


def _search(run) -> tuple[dict, dict]:
    """The best tiles for ``run`` (a :func:`_timer`) and every candidate's seconds: each
    (block_q, block_k) with 256 query rows per task, then the winner with other rows per task."""
    first = [(bq, bk, max(256, bq)) for bq in BLOCK_Q_CHOICES for bk in BLOCK_K_CHOICES]
    secs = _measure(run, first)
    bq, bk, rows = min(secs, key=secs.get)
    second = [(bq, bk, r) for r in TASK_ROWS_CHOICES if r % bq == 0 and r != rows and r >= bq]
    if second:
        again = _measure(run, [(bq, bk, rows)] + second)
        bq, bk, rows = min(again, key=again.get)
        secs.update({c: t for c, t in again.items() if c not in secs})
    choice = {
        "block_q": bq,
        "block_k": bk,
        "task_rows": rows,
        "ms": {f"{c[0]}x{c[1]}/{c[2]}": round(t * 1e3, 3) for c, t in secs.items()},
        "measured": _now(),
    }
    return choice, secs


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def tune_provider(forward, dt_name: str, width: int = 64) -> str | None:
    """The measured GEMM provider of ``dt_name`` in heads ``width`` wide (measured now if not
    stored, with the forward op's ``run``); None when tuning is off. Every installed provider's
    tiles are searched on the medium class of the width's class (64, or 128 for wider heads) and
    kept (that class is then known for each); the provider whose best is fastest wins, as
    ``gemm_providers.choose_fastest`` breaks near-ties. Stored under ``provider_key``."""
    width = width_class(width)

    def measure() -> dict:
        best = {}
        for name in GEMM_CALIBRATION_CANDIDATES:
            p = load_provider(name)
            if isinstance(p, str) or not p.supports(dt_name):
                continue
            choice, secs = _search(_timer(forward, np.dtype(dt_name), width, "medium", provider=p))
            best[name] = min(secs.values())
            remember(tile_key(name, dt_name, width, "medium"), choice)
        fastest = choose_fastest(best)
        return {"provider": fastest, "ms": {n: round(t * 1e3, 3) for n, t in best.items()}, "measured": _now()}

    got = tuned(provider_key(dt_name, width), measure, valid_provider_choice)
    return None if got is None else got["provider"]


def tune_tiles(forward, provider, dtype: np.dtype, width: int, length: str, name: str | None = None) -> dict | None:
    """The measured tiles of one class (measured now if not stored): {block_q, block_k,
    task_rows, ms (per candidate), measured (date)}; None when tuning is off. ``forward``: the
    forward op's ``run``; ``provider``: the GEMM provider of float operands (``None`` for 16-bit
    ones: the tile products the 16-bit path picks, AMX or MKL's 16-bit GEMM); ``name``: the
    provider's name in the tuning key (default: ``provider``'s, ``mkl`` for None)."""

    def measure() -> dict:
        # the 16-bit tiles of MKL's path are measured on it, not on the AMX path the same call takes
        return _search(_timer(forward, dtype, width, length, provider=provider, amx=name in OWN_TILES))[0]

    if name is None:
        name = "mkl" if provider is None else provider.name
    return tuned(tile_key(name, dtype_name(dtype), width, length), measure, valid_tiles)


#: the cache the decode order is measured on: (heads, keys, head size) in float32, K and V of 64
#: MiB each (more than most CPUs' L3, where the two orders differ most); float64 takes half the keys
DECODE_ORDER_PROBLEM = (8, 16384, 128)


def tune_decode_order(dtype: np.dtype) -> bool:
    """Whether the GEMV decode kernel reads a single query row's cache in address order on this
    machine (``GemvArgs.sequential``), measured now if not stored (its serial build, each order
    timed in this thread's CPU time, the least of :data:`ROUNDS` rounds); False when tuning is
    off. ``dtype``: float32 or float64."""
    from ...kernels.cpu.decode_gemv import GemvArgs, gemv_kernel

    def measure() -> dict:
        H, S, D = DECODE_ORDER_PROBLEM
        S = S * 4 // np.dtype(dtype).itemsize  # the same bytes in every dtype
        # the values do not change the work (no weight is 0 at this scale): ones, no random fill
        kc = np.ones((1, H, S, D), dtype)
        vc = np.ones((1, H, S, D), dtype)
        q = np.full((1, H, 1, D), 0.01, dtype)
        out, lse = np.empty((1, H, 1, D), dtype), np.empty((1, H, 1), dtype)
        kernel = gemv_kernel(True)

        def run(sequential: bool) -> float:
            seqlens = np.array([S], np.int64)
            args = GemvArgs(q, kc, vc, seqlens, True, -1, -1, 1.0, 1, 1, DECODE_BLOCK_K, sequential, out, lse)
            t = time.thread_time()
            kernel(args, ())
            return time.thread_time() - t

        secs = _measure(run, [(False,), (True,)])
        inter, seq = secs[(False,)], secs[(True,)]
        return {
            "sequential": seq < inter,
            "ms": {"interleaved": round(inter * 1e3, 3), "sequential": round(seq * 1e3, 3)},
            "measured": _now(),
        }

    got = tuned(f"decode-order/{np.dtype(dtype).name}", measure, lambda v: isinstance(v.get("sequential"), bool))
    return False if got is None else got["sequential"]
