"""Where the ``cpu`` forward's time goes, per case, on this machine (issue 29's time budget).

    python bench/prefill_budget.py [--threads N] [--rounds R] [--cases ...] [--json PATH | --no-json]

For each case (batch 1, 8 heads, the tiles and GEMM provider the engine chooses here, measured or
by rule) the kernel's work is split into its parts, each timed alone on one thread at the case's
tile shapes (a compiled loop of calls, this thread's CPU time, least of ``--rounds`` blocks), times
the number of tiles the call computes:

* ``scores GEMM``: the first product of every computed tile (MKL's generated GEMM for full tiles
  where the provider has one, else the provider's ``?gemm``);
* ``softmax pass``: the one pass over each score tile (exponential, row sums, row maxima;
  ``softmax_tile.exp_tile``), plus the column maxima of each query tile's first key tile;
* ``values GEMM``: the second product (accumulated, beta = 1);

then the whole kernel on one thread (its serial build, CPU time): ``other in kernel`` is what the
parts do not explain (per-task set-up, the copy of q, masks' checks, the final normalisation, cache
misses between passes). At ``--threads``: the call's wall time (own block after a pause) against
the ideal (the one-thread kernel split evenly, plus the call's set-up outside the kernel, timed
with the kernel replaced by a no-op): the difference is thread imbalance and the pool's cost. The
machine's sgemm rate (``torch.mm`` and NumPy, 2048^3 float32) and torch's SDPA on 1 and
``--threads`` threads come from the same run.

Writes ``bench/results/prefill-budget-<cpu>-<date>.json``. Figures taken while other work shares
the machine: the one-thread parts are CPU time (descheduling does not count; cache interference
does); the ``--threads`` wall times are only good when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: (name, L = S, head size, dtype, causal)
CASES = [
    ("L=S=512", 512, 64, "float32", False),
    ("L=S=1024", 1024, 64, "float32", False),
    ("L=S=4096", 4096, 64, "float32", False),
    ("L=S=4096 causal", 4096, 64, "float32", True),
    ("head 128, L=S=2048", 2048, 128, "float32", False),
    ("float64, L=S=2048", 2048, 64, "float64", False),
    ("bfloat16, L=S=1024", 1024, 64, "bfloat16", False),
    ("bfloat16, L=S=4096", 4096, 64, "bfloat16", False),
]
HEADS = 8
PAUSE_S = 0.3


def _least(fn, rounds: int, clock=time.thread_time) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def _np_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _plan(L, E, dtype, threads):
    """What the forward op would choose: (provider, TilePlan, generated-GEMM quadruple); 16-bit
    operands: the name of the engine's own tile products where they run (``amx``,
    ``avx512-bf16``), else MKL's 16-bit GEMM (None where it is not used: the inputs are widened to
    float32)."""
    import engine
    from engine.backends.cpu.forward import _tiles
    from engine.problems.attention import validate_attention_args
    from engine.runtime.gemm_jit import NO_JIT, tile_jit_kernels
    from engine.runtime.gemm_providers import sixteen_bit_gemm, sixteen_bit_tiles

    q = np.zeros((1, HEADS, L, E), _np_dtype(dtype))
    problem = validate_attention_args(q, q, q)
    op = engine.get_backend("cpu").op(type(problem))
    if dtype in ("bfloat16", "float16"):
        own = sixteen_bit_tiles(dtype)[1]
        if own:  # the engine's own tile products (AMX, VDPBF16PS): their operands are not MKL's
            return own, _tiles(op.run, problem, dtype, own, None, True), NO_JIT
        half = sixteen_bit_gemm(dtype)
        if half is None:
            return None, None, NO_JIT
        return half, _tiles(op.run, problem, dtype, half.name, None, True), NO_JIT
    provider = engine.get_gemm_provider(dtype)
    plan = _tiles(op.run, problem, dtype, provider.name, provider, True)
    jit = tile_jit_kernels(provider, dtype, plan.block_q, plan.block_k, E, E)
    return provider, plan, jit


def _tile_counts(L, S, block_q, block_k, causal):
    """(computed tiles, tiles with a full shape, query tiles) for one head."""
    n = full = 0
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        for j0 in range(0, S, block_k):
            if causal and j0 > i1 - 1:
                continue
            j1 = min(j0 + block_k, S)
            n += 1
            full += (i1 - i0) == block_q and (j1 - j0) == block_k
    return n, full, -(-L // block_q)


def _aligned_copy(x):
    """A C-ordered copy of ``x`` whose data starts on a 64-byte boundary."""
    raw = np.empty(x.nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    out = raw[off : off + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def _parts(provider, plan, jit, E, dtype, rounds):
    """Seconds per tile of each part at (block_q, block_k), one thread."""
    from numba import njit

    from engine.kernels.cpu.gemm import jit_gemm, tile_gemm, tile_gemm_16, tile_gemm_16_acc, tile_gemm_acc
    from engine.kernels.cpu.softmax_tile import column_max, exp_tile, exp_tile_bf16, exp_tile_f16

    bq, bk = plan.block_q, plan.block_k
    half = dtype in ("bfloat16", "float16")
    cdt = np.float32 if half else np.dtype(dtype)  # what the scores and accumulators are in
    kind, fn = provider.kind, provider.pointer(dtype)
    rng = np.random.default_rng(0)
    odt = _np_dtype(dtype)
    kt = rng.standard_normal((bk, E)).astype(odt)
    qt = (rng.standard_normal((E, bq)) / np.sqrt(E)).astype(odt)
    vt = rng.standard_normal((bk, E)).astype(odt)
    if half:
        kt, qt, vt = (x.view(np.uint16) for x in (kt, qt, vt))
    # every operand on a 64-byte cache line, as the kernel's scratch (tile_ops._aligned_empty): a
    # C matrix whose rows straddle lines made MKL's 16-bit GEMM 1.6x slower, so the part's time
    # depended on where the allocator happened to put it
    kt, qt, vt = (_aligned_copy(x) for x in (kt, qt, vt))
    st = _aligned_copy(np.empty((bk, bq), cdt))
    pt = _aligned_copy(np.empty((bk, bq), np.uint16 if half else cdt))
    acc = _aligned_copy(np.zeros((bq, E), cdt))
    shift = np.full(bq, 3.0, cdt)
    ts, tc, tmx, tm = np.zeros(bq), np.zeros(bq, cdt), np.zeros(bq, cdt), np.zeros(bq, cdt)
    one = np.dtype(cdt).type(1)
    reps = max(1, int(2e7 // (bq * bk * E)))
    if half:
        exp16 = exp_tile_bf16 if dtype == "bfloat16" else exp_tile_f16

        @njit
        def scores16(fn, kt, qt, st, n):
            for _ in range(n):
                tile_gemm_16(fn, kt, qt, st)

        @njit
        def values16(fn, pt, vt, acc, n):
            for _ in range(n):
                tile_gemm_16_acc(fn, pt.T, vt, acc)

        @njit
        def softmax16(st, pt, one, shift, ts, tc, tmx, n):
            for _ in range(n):
                exp16(st, pt, one, shift, ts, tc, tmx)

    j = np.array(jit, dtype=np.int64)

    @njit
    def scores(kind, fn, j, kt, qt, st, n):
        for _ in range(n):
            if j[0]:
                jit_gemm(j[0], j[1], kt, qt, st)
            else:
                tile_gemm(kind, fn, kt, qt, st)

    @njit
    def values(kind, fn, j, pt, vt, acc, n):
        for _ in range(n):
            if j[0]:
                jit_gemm(j[2], j[3], pt, vt, acc)
            else:
                tile_gemm_acc(kind, fn, pt.T, vt, acc)

    @njit
    def softmax(st, pt, one, shift, ts, tc, tmx, n):
        for _ in range(n):
            exp_tile(st, pt, one, shift, ts, tc, tmx)

    @njit
    def colmax(st, tm, n):
        for _ in range(n):
            column_max(st, tm)

    calls = {
        "scores": lambda n: scores(kind, fn, j, kt, qt, st, n),
        "softmax": lambda n: softmax(st, pt, one, shift, ts, tc, tmx, n),
        "values": lambda n: values(kind, fn, j, pt, vt, acc, n),
        "colmax": lambda n: colmax(st, tm, n),
    }
    if half:
        calls["scores"] = lambda n: scores16(fn, kt, qt, st, n)
        calls["softmax"] = lambda n: softmax16(st, pt, one, shift, ts, tc, tmx, n)
        calls["values"] = lambda n: values16(fn, pt, vt, acc, n)
    calls["scores"](1)
    out = {}
    for name, f in calls.items():
        acc[:] = 0
        out[name] = _least(lambda f=f: f(reps), rounds) / reps
    return out


class _NoKernel:
    """Stands in for the compiled kernel: does nothing (the set-up's measurement)."""

    targetoptions = {"parallel": False}  # (read by the forward's plain path)
    overloads = {}  # (no entry point to resolve: calls stay on this object)

    def __call__(self, args, mod_args):
        return None


def _kernel_one_thread(L, E, dtype, causal, rounds):
    """The whole call's kernel on one thread (the op run with its serial build), CPU time, and the
    call's set-up (a public call whose kernel is a no-op: the call plans are dropped before and
    after, so neither the plan nor its resolved entry point keeps the real kernel)."""
    import engine
    from engine.backends.cpu import forward as fwd
    from engine.plan import invalidate
    from engine.problems.attention import validate_attention_args

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, HEADS, L, E)).astype(_np_dtype(dtype)) for _ in range(3))
    problem = validate_attention_args(q, k, v, is_causal=causal)
    op = engine.get_backend("cpu").op(type(problem))
    kernel = _least(lambda: op.run(problem, serial=True), rounds)
    mod = fwd.kernels()
    real = mod.flash_kernel
    mod.flash_kernel = lambda *a, **kw: _NoKernel()
    invalidate()
    try:
        setup = _least(
            lambda: engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu"),
            rounds,
            time.perf_counter,
        )
    finally:
        mod.flash_kernel = real
        invalidate()
    return kernel, setup, (q, k, v)


def _wall(fn, rounds):
    """Median over ``rounds`` of ``bench/cpu_vs_torch.py``'s own blocks (a pause, 50 ms of untimed
    calls, then at least 50 ms of timed ones): one timed call right after a pause fell in the
    10-40 ms after it in which KVM guests run both libraries 2-4 times slower (bfloat16 at
    L = 1024 on AMD Zen 4: 24.5 ms against 15-17.5 ms in a loop)."""
    from bench.cpu_vs_torch import _calls_per_block, _own_block, _time

    calls = _calls_per_block(_time(fn))
    return statistics.median(_own_block(fn, calls) for _ in range(rounds))


def budget_case(name, L, E, dtype, causal, threads, rounds, gemm):
    import torch
    import torch.nn.functional as F

    import engine

    provider, plan, jit = _plan(L, E, dtype, threads)
    if provider is None:
        print(f"{name}: inputs widened to float32 here (no 16-bit GEMM): see the float32 cases")
        return None
    n, full, qtiles = _tile_counts(L, L, plan.block_q, plan.block_k, causal)
    own = isinstance(provider, str)  # the own 16-bit tile products: the kernel's total only
    parts = {} if own else _parts(provider, plan, jit, E, dtype, rounds)
    per_head = {
        "scores GEMM": n * parts.get("scores", 0.0),
        "softmax pass": n * parts.get("softmax", 0.0) + qtiles * parts.get("colmax", 0.0),
        "values GEMM": n * parts.get("values", 0.0),
    }
    totals = {} if own else {k: v * HEADS for k, v in per_head.items()}
    kernel1, setup, (q, k, v) = _kernel_one_thread(L, E, dtype, causal, rounds)
    totals["not split (own 16-bit tile products)" if own else "other in kernel"] = kernel1 - sum(totals.values())
    engine.set_num_threads(threads)
    wall = _wall(lambda: engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu"), rounds)
    ideal = kernel1 / threads + setup
    if dtype == "bfloat16":
        tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) for x in (q, k, v))
    else:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def run_torch():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    torch.set_num_threads(1)
    torch1 = _least(run_torch, rounds)
    torch.set_num_threads(threads)
    torchn = _wall(run_torch, rounds)
    flops = 4 * HEADS * L * L * E * (0.5 if causal else 1.0)
    gemm_flops = 2 * 2 * HEADS * n * plan.block_q * plan.block_k * E  # what the tile products do
    return {
        "case": name,
        "L": L,
        "E": E,
        "dtype": dtype,
        "causal": causal,
        "provider": provider if own else provider.name,
        "generated_gemm": bool(jit[0]),
        "block_q": plan.block_q,
        "block_k": plan.block_k,
        "task_rows": plan.block_q * plan.sub_tiles,
        "tiles_measured_here": plan.tuned,
        "tiles_per_head": n,
        "full_tiles_per_head": full,
        "per_tile_us": {k: v * 1e6 for k, v in parts.items()},
        "one_thread_ms": {k: v * 1e3 for k, v in totals.items()},
        "one_thread_kernel_ms": kernel1 * 1e3,
        "tile_gemm_gflops": None if own else gemm_flops / (totals["scores GEMM"] + totals["values GEMM"]) / 1e9,
        "setup_ms": setup * 1e3,
        f"wall_{threads}_threads_ms": wall * 1e3,
        "ideal_ms": ideal * 1e3,
        "imbalance_and_pool_ms": (wall - ideal) * 1e3,
        "torch_1_thread_ms": torch1 * 1e3,
        f"torch_{threads}_threads_ms": torchn * 1e3,
        "engine_gflops_1_thread": flops / kernel1 / 1e9,
        "torch_gflops_1_thread": flops / torch1 / 1e9,
        "sgemm_fraction_1_thread": flops / kernel1 / 1e9 / gemm["1"]["best"],
        f"engine_gflops_{threads}_threads": flops / wall / 1e9,
        f"sgemm_fraction_{threads}_threads": flops / wall / 1e9 / gemm[str(threads)]["best"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", help='case names, ";"-separated (default all)')
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-json", action="store_true")
    a = ap.parse_args(argv)

    import torch

    import engine
    from bench.cpu_vs_torch import _PAUSE, select_cases, sgemm_rate
    from engine.runtime.machine import cpu_info, result_file_name

    _PAUSE[0] = PAUSE_S
    cpu = cpu_info()
    print(f"CPU: {cpu['model_name']} ({cpu['vendor']} family {cpu['family']} model {cpu['model']})")
    cpu["loadavg_before"] = list(os.getloadavg())
    print(f"load average: {cpu['loadavg_before']}")
    gemm = {"1": sgemm_rate(1, clock=time.thread_time), str(a.threads): sgemm_rate(a.threads)}
    torch.set_num_threads(a.threads)
    print(
        "sgemm 2048^3 float32: "
        + "; ".join(
            f"{t} thread(s): " + ", ".join(f"{k} {v:.0f}" for k, v in g.items() if k != "best") for t, g in gemm.items()
        )
        + " GFLOP/s"
    )
    wanted = select_cases(a.cases) if a.cases else None
    rows = []
    for case in CASES:
        if wanted is not None and case[0] not in wanted:
            continue
        x = np.zeros((1, HEADS, case[1], case[2]), _np_dtype(case[3]))
        engine.scaled_dot_product_attention(x, x, x, backend="cpu")  # compiles, measures the class's tiles
        r = budget_case(*case, threads=a.threads, rounds=a.rounds, gemm=gemm)
        if r is None:
            continue
        rows.append(r)
        t = r["one_thread_ms"]
        print(
            f"\n{r['case']} ({r['dtype']}; {r['provider']}{' + generated GEMMs' if r['generated_gemm'] else ''}; "
            f"tiles {r['block_q']} x {r['block_k']}, {r['task_rows']} rows per task, "
            f"{'measured here' if r['tiles_measured_here'] else 'fixed rule'}; {r['tiles_per_head']} tiles per head)"
        )
        print(
            "  one thread, ms: "
            + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
            + f" = kernel {r['one_thread_kernel_ms']:.2f} ({r['engine_gflops_1_thread']:.0f} GFLOP/s, "
            f"{r['sgemm_fraction_1_thread'] * 100:.0f}% of sgemm"
            + ("" if r["tile_gemm_gflops"] is None else f"; tile products at {r['tile_gemm_gflops']:.0f}")
            + "); "
            f"torch {r['torch_1_thread_ms']:.2f} ({r['torch_gflops_1_thread']:.0f})"
        )
        print(
            f"  {a.threads} threads, ms: call {r[f'wall_{a.threads}_threads_ms']:.2f} = ideal {r['ideal_ms']:.2f} "
            f"(kernel / {a.threads} + set-up {r['setup_ms']:.2f}) + imbalance and pool "
            f"{r['imbalance_and_pool_ms']:.2f}; {r[f'sgemm_fraction_{a.threads}_threads'] * 100:.0f}% of sgemm; "
            f"torch {r[f'torch_{a.threads}_threads_ms']:.2f}",
            flush=True,
        )
    cpu["loadavg_after"] = list(os.getloadavg())
    print(f"\nload average after: {cpu['loadavg_after']}")
    if not a.no_json:
        path = a.json or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", result_file_name("prefill-budget", cpu)
        )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"cpu": cpu, "sgemm_gflops": gemm, "threads": a.threads, "cases": rows}, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
