"""Where the time of a decode step goes (issue 28's decode rows): the call's fixed cost against the
kernel's time, and within the kernel the key pass, the exp pass and the value pass, against a
streaming read of the same bytes.

    python bench/decode_budget.py [--threads 1] [--rounds 15]

Cases: B=1 H=8 D=64 at S = 128, 1024, 4096, and S = 32k with D = 128 (the bandwidth row of
``bench/percall_vs_torch.py``), float32, nothing written. For each, in one process, interleaved
(the order flips every round), the median over rounds of the mean per call of a block:

* ``call``: ``engine.attention_with_kvcache`` through its call plan;
* ``runner``: the plan's runner (outputs, argument tuple, the kernel's entry point) without the
  plan's per-call checks; ``kernel``: the kernel's entry point alone with the runner's arguments;
* ``K``, ``exp``, ``V``: a serial model of the one-row GEMV kernel's passes run alone (the key
  pass: four dot products per pass over the head dimension; max, ``fast_exp`` and sum of each
  256-key tile; the value pass: eight weighted value rows per pass over the accumulator);
* ``numba_sum``, ``torch_sum``: a streaming read of K and V (the same bytes), ``torch_sdpa``:
  torch's ``scaled_dot_product_attention`` on the same cache.

With ``--threads 1`` the clock is the thread's CPU time (time spent descheduled by other processes
does not count: readable on a shared machine); otherwise wall time. Writes
``bench/results/decode-budget-<cpu>-<threads>threads-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from percall_vs_torch import _spy_entry  # noqa: E402  (bench/ is not a package on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ((1, 8, 64, 128), (1, 8, 64, 1024), (1, 8, 64, 4096), (1, 8, 128, 32768))


def _models():
    """The serial pass models and the streaming read (compiled here, never by the tests)."""
    from numba import njit

    from engine.kernels.cpu.decode_gemv import _axpy8, _dot4, _row_max
    from engine.kernels.cpu.tile_ops import _FM
    from engine.kernels.fastexp import fast_exp

    @njit(fastmath=_FM, error_model="numpy")
    def passes(k, v, q, out, mode):
        """mode 1: key pass, 2: exp pass, 4: value pass (one row per head, 256-key tiles)."""
        _, H, S, D = k.shape
        T = 256
        sc = np.full((1, T), np.float32(1e-3))
        qs = np.empty((1, D), np.float32)
        ac = np.zeros((1, D), np.float32)
        for h in range(H):
            keys, values = k[0, h], v[0, h]
            qs[0] = q[0, h, 0]
            ac[0] = 0
            total = np.float32(0)
            j0 = 0
            while j0 < S:
                nk = min(T, S - j0)
                if mode & 1:
                    for c in range(0, nk - 3, 4):
                        t0, t1, t2, t3 = _dot4(keys, j0 + c, qs, 0, D)
                        sc[0, c] = t0
                        sc[0, c + 1] = t1
                        sc[0, c + 2] = t2
                        sc[0, c + 3] = t3
                if mode & 2:
                    mx = _row_max(sc, 0, nk, np.float32(-np.inf))
                    for c in range(nk):
                        p = fast_exp(sc[0, c] - mx)
                        sc[0, c] = p
                        total += p
                if mode & 4:
                    for c in range(0, nk - 7, 8):
                        _axpy8(ac, sc, c, values, j0 + c, D)
                j0 += nk
            out[0, h, 0] = ac[0] + total

    @njit(fastmath=_FM, error_model="numpy")
    def stream(k, v):
        _, H, S, D = k.shape
        t = np.float32(0)
        for h in range(H):
            a, b = k[0, h], v[0, h]
            for j in range(S):
                for d in range(D):
                    t += a[j, d]
            for j in range(S):
                for d in range(D):
                    t += b[j, d]
        return t

    return passes, stream


def case(B, H, D, S, threads, rounds, clock):
    import torch
    import torch.nn.functional as F

    import engine
    from engine.plan import lookup
    from engine.plan.decode import decode_key

    passes, stream = _models()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, H, 1, D), dtype=np.float32)
    kc = rng.standard_normal((B, H, S, D), dtype=np.float32)
    vc = rng.standard_normal((B, H, S, D), dtype=np.float32)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, kc, vc))
    out = np.empty_like(q)
    for _ in range(3):
        engine.attention_with_kvcache(q, kc, vc, cache_seqlens=S)
    plan = lookup(decode_key(q, kc, vc, None, None, S, None, True, None, None, None, (), False, None, "auto"))
    plain = plan.plain
    seqlens_k = np.full(B, S, np.int64)
    total = S * B
    scale = D**-0.5

    def run_plain():
        return plain(q, kc, vc, None, None, seqlens_k, S, total, scale, ())

    # the build the runner picks for this length (serial for short steps), found by trying both
    setup = plan.runner.setup
    entry = args = None
    for bound in setup.kernels:
        if bound.entry:
            try:
                entry, args = _spy_entry(bound, run_plain)
                break
            except KeyError:
                continue
    fns = {
        "call": lambda: engine.attention_with_kvcache(q, kc, vc, cache_seqlens=S),
        "runner": run_plain,
        "kernel": lambda: entry(*args),
        "K": lambda: passes(kc, vc, q, out, 1),
        "exp": lambda: passes(kc, vc, q, out, 2),
        "V": lambda: passes(kc, vc, q, out, 4),
        "numba_sum": lambda: stream(kc, vc),
        "torch_sum": lambda: tk.sum() + tv.sum(),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(tq, tk, tv),
    }
    nbytes = kc.nbytes + vc.nbytes
    calls = max(2, min(1000, int(0.02 / (nbytes / 10e9))))
    times = {n: [] for n in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            fn()
            t = clock()
            for _ in range(calls):
                fn()
            times[name].append((clock() - t) / calls)
    us = {n: statistics.median(v) * 1e6 for n, v in times.items()}
    row = {"case": f"B={B} H={H} D={D} S={S}", "threads": threads, "bytes": nbytes, "us": us}
    row["fixed_us"] = us["call"] - us["kernel"]
    row["plan_checks_us"] = us["call"] - us["runner"]
    row["kernel_GBps"] = nbytes / us["kernel"] / 1e3
    row["torch_sdpa_over_call"] = us["torch_sdpa"] / us["call"]
    row["torch_sum_over_call"] = us["torch_sum"] / us["call"]
    print(
        f"{row['case']:24s} "
        + " ".join(f"{n} {v:.1f}" for n, v in us.items())
        + f" | fixed {row['fixed_us']:.1f} us, kernel {row['kernel_GBps']:.1f} GB/s,"
        f" sdpa/call {row['torch_sdpa_over_call']:.2f}, sum/call {row['torch_sum_over_call']:.2f}",
        flush=True,
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="where to write the results (default bench/results/...)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    import torch
    from threadpoolctl import threadpool_limits

    import engine
    from engine.runtime.machine import cpu_info, machine_info, result_file_name

    torch.set_num_threads(args.threads)
    engine.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    load_before = os.getloadavg()
    with threadpool_limits(limits=args.threads):
        rows = [case(*c, args.threads, args.rounds, clock) for c in CASES]
    out = {
        "machine": machine_info(),
        "cpu": cpu_info(),
        "threads": args.threads,
        "rounds": args.rounds,
        "clock": "thread CPU time" if args.threads == 1 else "wall time",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": rows,
    }
    path = args.json or os.path.join(
        HERE, "results", result_file_name(f"decode-budget-{args.threads}threads", cpu_info())
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"load average before {load_before}, after {out['load_average_after']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
