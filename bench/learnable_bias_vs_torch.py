"""The backward of a learned relative-position bias: the engine's ``mod_args`` gradients against
PyTorch's SDPA backward with the same bias as a dense float ``attn_mask`` (issue 30's table).

    python bench/learnable_bias_vs_torch.py [--quick] [--threads N] [--rounds R] [--json PATH]

The bias is ``table[h, i - j + S - 1]`` (``engine.models.relative_bias.relative_bias``), a table of
H x (L + S - 1) floats. Engine: ``engine.scaled_dot_product_attention_backward`` from a saved
``(out, lse)`` with the table marked (``return_mod_args_grad``): dq, dk, dv and the table's
gradient, no L x S array. torch: ``torch.autograd.grad`` through a retained graph of
``F.scaled_dot_product_attention(q, k, v, attn_mask=bias)`` with ``bias`` an (H, L, S) leaf that
requires grad (torch's SDPA backward alone: dq, dk, dv, dbias), and, second figure, with
``bias = table[:, index]`` so that torch also sums dbias into the table (what training the table
costs in torch). Float32, batch 1, head size 64, both libraries on the same threads, alternating
blocks, medians (``bench/cpu_backward_vs_torch.py``'s method). Ratio = torch time / engine time;
the target is engine <= 1.5 x torch, i.e. ratio >= 1/1.5.

Memory: peak resident-set growth of a child process running one engine backward with the table
marked, at L = S = 4096 (the dense bias alone is H x L x S x 4 bytes = 512 MiB there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

#: (name, heads, L = S, causal)
CASES = [
    ("rel-bias H=8 L=1024", 8, 1024, False),
    ("rel-bias H=8 L=1024 causal", 8, 1024, True),
    ("rel-bias H=8 L=4096", 8, 4096, False),
    ("rel-bias H=8 L=4096 causal", 8, 4096, True),
]
E = 64
TARGET = 1 / 1.5
BLOCK_SECONDS = 0.6


def _inputs(heads, L, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((1, heads, L, E)).astype(np.float32) for _ in range(4))
    table = (0.1 * rng.standard_normal((heads, 2 * L - 1))).astype(np.float32)
    return q, k, v, do, table


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternate(runs, rounds):
    """Medians of alternating blocks of each function in ``runs`` (the order rotates every round)."""
    for fn in runs:
        fn()
    calls = max(1, min(5, round(BLOCK_SECONDS / max(_time(runs[0]), 1e-4))))

    def block(fn):
        fn()
        return _time(lambda: [fn() for _ in range(calls)]) / calls

    times = [[] for _ in runs]
    for r in range(rounds):
        order = list(range(len(runs)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            times[i].append(block(runs[i]))
    return [statistics.median(t) for t in times], times


def case(name, heads, L, causal, rounds):
    import torch
    import torch.nn.functional as F

    import engine
    from engine.models.relative_bias import dense_bias, relative_bias

    q, k, v, do, table = _inputs(heads, L)
    kw = dict(score_mod=relative_bias, mod_args=(table, L - 1), is_causal=causal)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    ttable = torch.from_numpy(table).requires_grad_()
    tdo = torch.from_numpy(do)
    causal_mask = torch.ones(L, L, dtype=torch.bool).tril() if causal else None
    with torch.no_grad():
        dense = dense_bias(ttable, None, L, L)
        if causal:
            dense = dense.masked_fill(~causal_mask, -torch.inf)
    bias = dense.clone().requires_grad_()
    tout = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias)
    gathered = dense_bias(ttable, None, L, L)
    if causal:
        gathered = gathered.masked_fill(~causal_mask, -torch.inf)
    tout2 = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=gathered)

    def run_engine():
        engine.scaled_dot_product_attention_backward(
            do, q, k, v, out, lse, backend="cpu", return_mod_args_grad=(True, False), **kw
        )

    def run_torch():
        torch.autograd.grad(tout, (tq, tk, tv, bias), tdo, retain_graph=True)

    def run_torch_table():
        torch.autograd.grad(tout2, (tq, tk, tv, ttable), tdo, retain_graph=True)

    (me, mt, mt2), times = _alternate([run_engine, run_torch, run_torch_table], rounds)
    return {
        "case": name,
        "heads": heads,
        "L": L,
        "S": L,
        "E": E,
        "causal": causal,
        "engine_ms": me * 1e3,
        "torch_sdpa_backward_ms": mt * 1e3,
        "torch_with_table_ms": mt2 * 1e3,
        "ratio": mt / me,
        "ratio_with_table": mt2 / me,
        "target": f"ratio >= {TARGET:.3f} (engine <= 1.5 x torch)",
        "met": mt / me >= TARGET,
        "times_s": {"engine": times[0], "torch": times[1], "torch_with_table": times[2]},
    }


def _child_memory(L, heads, threads):
    import engine
    from engine.models.relative_bias import relative_bias

    engine.set_num_threads(threads)
    q, k, v, do, table = _inputs(heads, L)
    kw = dict(score_mod=relative_bias, mod_args=(table, L - 1))
    small = [a[:, :, :64] for a in (q, k, v, do)]
    o, l_ = engine.scaled_dot_product_attention(
        *small[:3], return_lse=True, score_mod=relative_bias, mod_args=(table, 63)
    )
    engine.scaled_dot_product_attention_backward(
        small[3], *small[:3], o, l_, score_mod=relative_bias, mod_args=(table, 63), return_mod_args_grad=(True, False)
    )  # compile first
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss("VmRSS")
    grads = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, return_mod_args_grad=(True, False), **kw
    )
    peak = _rss("VmHWM")
    io = sum(a.nbytes for a in (q, k, v, out, do, lse, table)) + sum(g.nbytes for g in grads[:3]) + table.nbytes
    print(json.dumps({"L": L, "heads": heads, "peak_growth_bytes": peak - before, "inputs_outputs_bytes": io,
                      "dense_bias_bytes": heads * L * L * 4}))  # fmt: skip


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


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
    r["growth_over_io"] = r["peak_growth_bytes"] / r["inputs_outputs_bytes"]
    r["growth_over_dense_bias"] = r["peak_growth_bytes"] / r["dense_bias_bytes"]
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, L = 1024 only, memory at L = 1024")
    ap.add_argument("--threads", type=int, default=2, help="threads for both libraries (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here ('auto': bench/results/)")
    ap.add_argument("--child-memory", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_memory:
        return _child_memory(*a.child_memory)

    import numba
    import torch

    import engine
    from engine.runtime.machine import cpu_info, result_file_name

    threads = min(a.threads, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(threads)
    engine.set_num_threads(threads)
    rounds = a.rounds or (3 if a.quick else 7)
    load_before = os.getloadavg()
    print(
        f"learned relative bias: engine cpu backward (mod_args gradient) vs torch {torch.__version__} SDPA "
        f"backward with a dense float bias; {threads} threads each; float32, batch 1, head size {E}; "
        f"median of {rounds} rounds; load average {load_before[0]:.1f}"
    )
    print(f"{'case':<30}{'engine ms':>11}{'torch ms':>10}{'ratio':>7}{'+table ms':>11}{'ratio':>7}  met")
    rows = []
    for c in CASES:
        if a.quick and c[2] > 1024:
            continue
        r = case(*c, rounds=rounds)
        rows.append(r)
        print(
            f"{r['case']:<30}{r['engine_ms']:>11.1f}{r['torch_sdpa_backward_ms']:>10.1f}{r['ratio']:>7.2f}"
            f"{r['torch_with_table_ms']:>11.1f}{r['ratio_with_table']:>7.2f}  {'yes' if r['met'] else 'NO'}",
            flush=True,
        )
    mem = memory_case(1024 if a.quick else 4096, 8, threads)
    print(
        f"memory, L=S={mem['L']}, H={mem['heads']}: peak RSS growth {mem['peak_growth_bytes'] / 2**20:.0f} MiB "
        f"= {mem['growth_over_io']:.2f} x (inputs + outputs); the dense bias alone: "
        f"{mem['dense_bias_bytes'] / 2**20:.0f} MiB",
        flush=True,
    )
    if a.json:
        info = cpu_info()
        info["loadavg_before"] = list(load_before)
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        path = a.json
        if a.json == "auto":
            path = os.path.join(results, result_file_name(f"learnable-bias-vs-torch-{threads}threads", info))
        result = {
            "command": "python bench/learnable_bias_vs_torch.py" + (" --quick" if a.quick else ""),
            "threads": threads,
            "rounds": rounds,
            "torch": torch.__version__,
            "cases": rows,
            "memory": mem,
            "machine": info,
        }
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
