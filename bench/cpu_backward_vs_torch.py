"""The ``cpu`` backend's backward against PyTorch's CPU SDPA backward (issue 15's table).

    python bench/cpu_backward_vs_torch.py [--quick] [--threads N] [--rounds R] [--json PATH]

Every speed figure is a ratio torch_time / engine_time measured in this one run, both libraries on
the same thread count, alternating engine/torch blocks (the order flips every round; each block is
one untimed call, then the mean of a few timed ones), medians over the rounds (see
``bench/cpu_vs_torch.py`` for why blocks). Float32, batch 1, head size 64.

- backward: ``engine.scaled_dot_product_attention_backward`` from a saved ``(out, lse)`` against
  ``torch.autograd.grad`` of ``F.scaled_dot_product_attention`` through a retained graph (torch's
  backward kernel alone);
- training step: forward + backward through ``engine.torch.scaled_dot_product_attention`` (what a
  model trained through the engine runs) against torch's forward + backward;
- memory: peak resident-set growth of a child process running one backward at L = S = 16384,
  against the size of its inputs (q, k, v, out, grad_out, lse) and outputs (dq, dk, dv);
- gradient errors against torch float64 autograd: float32 max error against twice torch float32's
  own (FlashAttention's test rule), float64 max error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

#: (name, heads, L = S, causal, target ratio)
BACKWARD_CASES = [
    ("H=8 L=1024", 8, 1024, False, 1.0),
    ("H=8 L=1024 causal", 8, 1024, True, 1.0),
    ("H=8 L=4096", 8, 4096, False, 1.0),
    ("H=8 L=4096 causal", 8, 4096, True, 1.0),
    ("H=2 L=4096", 2, 4096, False, 1.5),
    ("H=1 L=4096 (heads < threads)", 1, 4096, False, 1.5),
    ("H=1 L=4096 causal (heads < threads)", 1, 4096, True, 1.5),
]
STEP_CASES = [
    ("step H=8 L=1024", 8, 1024, False, 1.0),
    ("step H=8 L=1024 causal", 8, 1024, True, 1.0),
    ("step H=8 L=4096", 8, 4096, False, 1.0),
    ("step H=8 L=4096 causal", 8, 4096, True, 1.0),
]
E = 64
MEMORY_LIMIT = 3.0
#: a block lasts about this long (at least one timed call)
BLOCK_SECONDS = 0.6


def _inputs(heads, L, dtype="float32", seed=0, n=4):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, heads, L, E)).astype(dtype) for _ in range(n)]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternate(run_engine, run_torch, rounds):
    """Medians of alternating blocks; returns (engine s, torch s, per-round ratios)."""
    run_engine(), run_torch()  # warm both
    calls = max(1, min(5, round(BLOCK_SECONDS / max(_time(run_engine), 1e-4))))

    def block(fn):
        fn()
        return _time(lambda: [fn() for _ in range(calls)]) / calls

    te, tt = [], []
    for r in range(rounds):
        order = [(run_engine, te), (run_torch, tt)]
        for fn, times in order if r % 2 == 0 else order[::-1]:
            times.append(block(fn))
    return statistics.median(te), statistics.median(tt), [b / a for a, b in zip(te, tt)]


def backward_case(name, heads, L, causal, target, rounds):
    import torch
    import torch.nn.functional as F

    import engine

    q, k, v, do = _inputs(heads, L)
    out, lse = engine.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True, backend="cpu")
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    tout = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    tdo = torch.from_numpy(do)

    def run_engine():
        engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, is_causal=causal, backend="cpu")

    def run_torch():
        torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)

    me, mt, rounds_ratio = _alternate(run_engine, run_torch, rounds)
    ratio = mt / me
    flops = 5 * 2 * heads * L * L * E * (0.5 if causal else 1.0)  # five tile products
    return {
        "case": name,
        "heads": heads,
        "L": L,
        "S": L,
        "E": E,
        "causal": causal,
        "engine_ms": me * 1e3,
        "torch_ms": mt * 1e3,
        "ratio": ratio,
        "target": f">= {target}",
        "met": ratio >= target,
        "engine_gflops": flops / me / 1e9,
        "round_ratios": rounds_ratio,
    }


def step_case(name, heads, L, causal, target, rounds):
    import torch
    import torch.nn.functional as F

    import engine.torch as et

    q, k, v, do = _inputs(heads, L)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    tdo = torch.from_numpy(do)

    def run_engine():
        torch.autograd.grad(et.scaled_dot_product_attention(tq, tk, tv, is_causal=causal), (tq, tk, tv), tdo)

    def run_torch():
        torch.autograd.grad(F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal), (tq, tk, tv), tdo)

    me, mt, rounds_ratio = _alternate(run_engine, run_torch, rounds)
    ratio = mt / me
    return {
        "case": name,
        "heads": heads,
        "L": L,
        "S": L,
        "E": E,
        "causal": causal,
        "engine_ms": me * 1e3,
        "torch_ms": mt * 1e3,
        "ratio": ratio,
        "target": f">= {target}",
        "met": ratio >= target,
        "round_ratios": rounds_ratio,
    }


def gradient_errors(heads, L, causal):
    """Max abs errors of dq, dk, dv against torch float64 autograd (float32 engine vs 2 x torch
    float32's own; float64 engine)."""
    import torch
    import torch.nn.functional as F

    import engine

    q, k, v, do = _inputs(heads, L, "float64", seed=1)

    def torch_grads(dtype):
        leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        return [g.double().numpy() for g in torch.autograd.grad(out, leaves, torch.tensor(do, dtype=dtype))]

    truth, own32 = torch_grads(torch.float64), torch_grads(torch.float32)
    result = {"heads": heads, "L": L, "causal": causal}
    for dtype in ("float32", "float64"):
        a = [x.astype(dtype) for x in (q, k, v, do)]
        out, lse = engine.scaled_dot_product_attention(*a[:3], is_causal=causal, return_lse=True, backend="cpu")
        grads = engine.scaled_dot_product_attention_backward(a[3], *a[:3], out, lse, is_causal=causal, backend="cpu")
        for name, g, t, o in zip(("dq", "dk", "dv"), grads, truth, own32):
            err = float(np.abs(g.astype(np.float64) - t).max())
            if dtype == "float32":
                torch_err = float(np.abs(o - t).max())
                result[f"{name}_float32"] = {
                    "engine_err": err,
                    "torch_float32_err": torch_err,
                    "ratio": err / torch_err,
                    "met": err <= 2 * torch_err,
                }
            else:
                result[f"{name}_float64"] = {"engine_err": err, "met": err <= 1e-10}
    return result


# ---------------------------------------------------------------- memory (child process)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child_memory(L, heads, threads):
    """Peak RSS growth of one backward call, inputs excluded (they exist before the reset):
    outputs and every temporary. Linux only (VmHWM after clear_refs)."""
    import engine

    engine.set_num_threads(threads)
    small = _inputs(1, 64)
    o, l_ = engine.scaled_dot_product_attention(*small[:3], return_lse=True, backend="cpu")
    engine.scaled_dot_product_attention_backward(small[3], *small[:3], o, l_, backend="cpu")  # load kernels
    q, k, v, do = _inputs(heads, L)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, backend="cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes("VmRSS")
    t = time.perf_counter()
    dq, dk, dv = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu")
    seconds = time.perf_counter() - t
    peak = _rss_bytes("VmHWM")
    inputs = sum(a.nbytes for a in (q, k, v, out, do, lse))
    outputs = dq.nbytes + dk.nbytes + dv.nbytes
    print(
        json.dumps(
            {
                "L": L,
                "heads": heads,
                "E": E,
                "dtype": "float32",
                "seconds": seconds,
                "peak_growth_bytes": peak - before,
                "inputs_bytes": inputs,
                "outputs_bytes": outputs,
                "score_matrix_bytes": heads * L * L * 4,
            }
        )
    )


def memory_case(L, heads, threads):
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child-memory", str(L), str(heads), str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    # inputs exist before the measurement starts, so the growth is outputs + temporaries; the
    # target compares what a call holds at its peak (inputs + growth) with inputs + outputs
    io = r["inputs_bytes"] + r["outputs_bytes"]
    r["peak_over_io"] = (r["inputs_bytes"] + r["peak_growth_bytes"]) / io
    r["growth_over_io"] = r["peak_growth_bytes"] / io
    r["target"] = f"growth < {MEMORY_LIMIT} x (inputs + outputs)"
    r["met"] = r["growth_over_io"] < MEMORY_LIMIT
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, L = 1024 cases only, memory at H=1")
    ap.add_argument("--threads", type=int, default=2, help="threads for both libraries (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--child-memory", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_memory:
        return _child_memory(*a.child_memory)

    import numba
    import torch

    import engine

    threads = min(a.threads, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(threads)
    engine.set_num_threads(threads)
    rounds = a.rounds or (3 if a.quick else 7)
    keep = (lambda c: c[2] <= 1024) if a.quick else (lambda c: True)
    print(
        f"engine cpu backward vs torch {torch.__version__} SDPA backward; {threads} threads each; "
        f"float32, batch 1, head size {E}; median of {rounds} alternating rounds"
    )
    print(f"{'case':<38}{'engine ms':>11}{'torch ms':>10}{'ratio':>8}{'target':>9}  met")
    rows = {"backward": [], "step": []}
    for kind, cases, fn in (("backward", BACKWARD_CASES, backward_case), ("step", STEP_CASES, step_case)):
        for case in filter(keep, cases):
            r = fn(*case, rounds=rounds)
            rows[kind].append(r)
            print(
                f"{r['case']:<38}{r['engine_ms']:>11.1f}{r['torch_ms']:>10.1f}{r['ratio']:>8.2f}"
                f"{r['target']:>9}  {'yes' if r['met'] else 'NO'}",
                flush=True,
            )
    errors = [gradient_errors(8, 1024 if not a.quick else 256, causal) for causal in (False, True)]
    for e in errors:
        f32 = ", ".join(
            f"{n} {e[n + '_float32']['engine_err']:.2e} (torch {e[n + '_float32']['torch_float32_err']:.2e},"
            f" x{e[n + '_float32']['ratio']:.2f})"
            for n in ("dq", "dk", "dv")
        )
        f64 = max(e[n + "_float64"]["engine_err"] for n in ("dq", "dk", "dv"))
        print(
            f"errors vs torch float64, H={e['heads']} L={e['L']}{' causal' if e['causal'] else ''}: float32 "
            f"{f32}; float64 max {f64:.2e}",
            flush=True,
        )
    mem = memory_case(16384 if not a.quick else 4096, 1 if a.quick else 8, threads)
    print(
        f"backward memory, L=S={mem['L']}, {mem['heads']} heads: peak RSS growth "
        f"{mem['peak_growth_bytes'] / 2**20:.0f} MiB = {mem['growth_over_io']:.2f} x (inputs + outputs = "
        f"{(mem['inputs_bytes'] + mem['outputs_bytes']) / 2**20:.0f} MiB; the score matrix alone would be "
        f"{mem['score_matrix_bytes'] / 2**20:.0f} MiB); target < {MEMORY_LIMIT}: {'yes' if mem['met'] else 'NO'}; "
        f"call {mem['seconds']:.1f} s",
        flush=True,
    )
    if a.json:
        from engine.runtime.machine import cpu_model

        cpu_model = cpu_model()
        result = {
            "command": "python bench/cpu_backward_vs_torch.py" + (" --quick" if a.quick else ""),
            "threads": threads,
            "rounds": rounds,
            **rows,
            "gradient_errors": errors,
            "memory": mem,
            "machine": {
                "cpu_model": cpu_model,
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "load_average_at_end": os.getloadavg(),
                "numba_threading_layer": numba.config.THREADING_LAYER,
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            },
            "versions": {
                "numpy": np.__version__,
                "numba": numba.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
