"""The ``cpu`` backend against PyTorch's CPU ``scaled_dot_product_attention`` (issue 4's table).

    python bench/cpu_vs_torch.py [--quick] [--threads N] [--rounds R] [--json PATH]

Every speed figure is a ratio torch_time / engine_time measured in this one run: both libraries
on the same thread count (``torch.set_num_threads`` and ``engine.set_num_threads``), alternating
engine/torch (the order flips every round), medians over the rounds. The headline ratio
alternates *blocks*: one untimed call, then the mean of BLOCK_CALLS calls. Each library's pool
keeps spinning for a while after a call (torch's OpenMP workers most), which on a 2-core machine
steals the next call's cores; the untimed call absorbs that switch, so each library is measured
at its own steady state. The ratio of single calls alternating one by one, which includes that
interference, is reported too (``per_call_alternation_ratio``). Memory is the
peak resident-set growth of a child process running one L = 16384 call; cold start is timed in
fresh child processes with an empty and then a warm Numba cache (wall time, which other load
on the machine inflates, and the process's CPU time, which it does not). ``--quick`` runs fewer rounds and
a smaller memory case, for a smoke check; the committed table comes from a full run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

#: (name, L = S, head size, dtype, causal, target ratio): batch 1, 8 heads
SPEED_CASES = [
    ("L=S=1024", 1024, 64, "float32", False, 1.0),
    ("L=S=4096", 4096, 64, "float32", False, 1.0),
    ("L=S=4096 causal", 4096, 64, "float32", True, 1.0),
    ("head 128, L=S=2048", 2048, 128, "float32", False, 1.0),
    ("float64, L=S=2048", 2048, 64, "float64", False, 1.0),
]
HEADS = 8
#: timed calls per block (after one untimed call), see the module docstring
BLOCK_CALLS = 3
COMPILE_LIMIT_S = 20.0
WARM_FIRST_CALL_LIMIT_S = 1.0


def _inputs(L, E, dtype, heads=HEADS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, heads, L, E)).astype(dtype) for _ in range(3)]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed_case(name, L, E, dtype, causal, target, rounds):
    import torch
    import torch.nn.functional as F

    import engine

    q, k, v = _inputs(L, E, dtype)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))

    def run_engine():
        engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")

    def run_torch():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    out = engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal).numpy()
    max_err = float(np.abs(out - expected).max())
    run_engine(), run_torch()  # warm both

    def block(fn):  # one untimed call absorbs the switch from the other library, then the mean
        fn()
        return _time(lambda: [fn() for _ in range(BLOCK_CALLS)]) / BLOCK_CALLS

    te, tt, ce, ct = [], [], [], []
    for r in range(rounds):
        first, second = ((run_engine, te, ce), (run_torch, tt, ct)) if r % 2 == 0 else \
            ((run_torch, tt, ct), (run_engine, te, ce))
        for fn, blocks, _ in (first, second):
            blocks.append(block(fn))
        for fn, _, calls in (first, second):
            calls.append(_time(fn))
    me, mt = statistics.median(te), statistics.median(tt)
    ratio = mt / me
    call_ratio = statistics.median(ct) / statistics.median(ce)
    flops = 2 * HEADS * L * L * 2 * E * (0.5 if causal else 1.0)
    return {"case": name, "L": L, "S": L, "E": E, "dtype": dtype, "causal": causal, "heads": HEADS,
            "engine_ms": me * 1e3, "torch_ms": mt * 1e3, "ratio": ratio, "target": f">= {target}",
            "met": ratio >= target, "engine_gflops": flops / me / 1e9, "torch_gflops": flops / mt / 1e9,
            "round_ratios": [b / a for a, b in zip(te, tt)], "max_abs_err_vs_torch": max_err,
            "per_call_alternation_ratio": call_ratio,
            "per_call_engine_ms": statistics.median(ce) * 1e3, "per_call_torch_ms": statistics.median(ct) * 1e3}


# ---------------------------------------------------------------- child processes

def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child_memory(L, heads, threads):
    """Peak RSS growth of one call, from before its inputs exist: inputs, output and workspace.

    On Linux the peak (VmHWM) is reset first (``/proc/self/clear_refs``), so what the imports and
    the warm-up compile left behind does not hide the call's own peak; elsewhere ru_maxrss is used.
    """
    import engine

    engine.set_num_threads(threads)
    small = _inputs(64, 64, "float32", heads=1)
    engine.scaled_dot_product_attention(*small, backend="cpu")  # load the kernel first
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak_of = _rss_bytes("VmRSS"), (lambda: _rss_bytes("VmHWM"))
        method = "VmHWM after clear_refs - VmRSS"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
        method = "ru_maxrss growth"
    q, k, v = _inputs(L, 64, "float32", heads=heads)
    t = time.perf_counter()
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    seconds = time.perf_counter() - t
    peak = peak_of()
    io_bytes = q.nbytes + k.nbytes + v.nbytes + out.nbytes
    print(json.dumps({"L": L, "heads": heads, "E": 64, "dtype": "float32", "seconds": seconds,
                      "peak_growth_bytes": peak - before, "inputs_plus_output_bytes": io_bytes,
                      "score_matrix_bytes": heads * L * L * 4, "method": method}))


def _child_start(threads):
    """Import, then the first call of every CPU kernel signature; prints seconds for each."""
    t0 = time.perf_counter()
    import engine

    engine.set_num_threads(threads)
    t_import = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    calls, cpu = {}, {}
    for dtype in ("float32", "float64"):
        q, k, v = _inputs(32, 16, dtype, heads=2)
        for kind, kw in (("none", {}), ("bool", {"attn_mask": rng.random((32, 32)) > 0.5}),
                         ("float", {"attn_mask": rng.standard_normal((32, 32)).astype(dtype)}),
                         ("causal", {"is_causal": True})):
            c0 = time.process_time()
            calls[f"{dtype}/{kind}"] = _time(
                lambda: engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw))
            cpu[f"{dtype}/{kind}"] = time.process_time() - c0
    print(json.dumps({"import_s": t_import, "first_calls_s": calls, "first_calls_cpu_s": cpu}))


def _run_child(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    res = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_case(L, heads, threads):
    r = _run_child(["--child-memory", str(L), str(heads), str(threads)])
    r["growth_over_io"] = r["peak_growth_bytes"] / r["inputs_plus_output_bytes"]
    r["target"] = "< 2.0 x (inputs + output)"
    r["met"] = r["growth_over_io"] < 2.0
    return r


def cold_start(threads):
    with tempfile.TemporaryDirectory(prefix="ae-numba-cache-") as cache:
        env = {"NUMBA_CACHE_DIR": cache}
        cold = _run_child(["--child-start", str(threads)], env)
        warm = _run_child(["--child-start", str(threads)], env)
    compile_s = sum(cold["first_calls_s"].values()) - sum(warm["first_calls_s"].values())
    compile_cpu_s = sum(cold["first_calls_cpu_s"].values()) - sum(warm["first_calls_cpu_s"].values())
    warm_first = next(iter(warm["first_calls_s"].values()))
    return {"compile_all_cpu_kernels_s": compile_s, "compile_target": f"< {COMPILE_LIMIT_S} s",
            "compile_met": compile_s < COMPILE_LIMIT_S, "compile_cpu_time_s": compile_cpu_s,
            "warm_cache_import_s": warm["import_s"], "warm_cache_first_call_s": warm_first,
            "warm_first_call_target": f"< {WARM_FIRST_CALL_LIMIT_S} s",
            "warm_first_call_met": warm_first < WARM_FIRST_CALL_LIMIT_S,
            "cold": cold, "warm": warm}


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, memory case at H=1 (smoke check)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both libraries (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--child-memory", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-start", nargs=1, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_memory:
        return _child_memory(*a.child_memory)
    if a.child_start:
        return _child_start(*a.child_start)

    import numba
    import torch

    import engine

    threads = min(a.threads, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(threads)
    engine.set_num_threads(threads)
    rounds = a.rounds or (3 if a.quick else 7)

    print(f"engine cpu backend vs torch {torch.__version__} SDPA; {threads} threads each; "
          f"batch 1, {HEADS} heads; median of {rounds} alternating rounds")
    print(f"{'case':<22}{'engine ms':>11}{'torch ms':>10}{'ratio':>8}{'target':>9}  met   err"
          "      per-call ratio")
    speed = []
    for case in SPEED_CASES:
        r = speed_case(*case, rounds=rounds)
        speed.append(r)
        print(f"{r['case']:<22}{r['engine_ms']:>11.1f}{r['torch_ms']:>10.1f}{r['ratio']:>8.2f}"
              f"{r['target']:>9}  {'yes' if r['met'] else 'NO ':<4}{r['max_abs_err_vs_torch']:.1e}"
              f"{r['per_call_alternation_ratio']:>10.2f}",
              flush=True)
    mem = memory_case(16384, 1 if a.quick else HEADS, threads)
    print(f"L=S=16384 memory ({mem['heads']} heads): peak RSS growth "
          f"{mem['peak_growth_bytes'] / 2**20:.0f} MiB = {mem['growth_over_io']:.2f} x inputs+output "
          f"({mem['inputs_plus_output_bytes'] / 2**20:.0f} MiB; the score matrix alone would be "
          f"{mem['score_matrix_bytes'] / 2**20:.0f} MiB); target < 2.0: {'yes' if mem['met'] else 'NO'}; "
          f"call {mem['seconds']:.1f} s", flush=True)
    start = cold_start(threads)
    print(f"cold start: all CPU kernels compile in {start['compile_all_cpu_kernels_s']:.1f} s wall, "
          f"{start['compile_cpu_time_s']:.1f} s CPU "
          f"(target < {COMPILE_LIMIT_S:.0f}: {'yes' if start['compile_met'] else 'NO'}); warm cache: "
          f"import {start['warm_cache_import_s']:.2f} s, first call {start['warm_cache_first_call_s']:.3f} s "
          f"(target < {WARM_FIRST_CALL_LIMIT_S:.0f}: {'yes' if start['warm_first_call_met'] else 'NO'})")
    if a.json:
        result = {"command": "python bench/cpu_vs_torch.py" + (" --quick" if a.quick else ""),
                  "threads": threads, "rounds": rounds, "speed": speed, "memory": mem,
                  "cold_start": start,
                  "machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "cpu_count": os.cpu_count(),
                              "numba_threading_layer": numba.config.THREADING_LAYER,
                              "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")},
                  "versions": {"numpy": np.__version__, "numba": numba.__version__,
                               "torch": torch.__version__, "python": platform.python_version()},
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
