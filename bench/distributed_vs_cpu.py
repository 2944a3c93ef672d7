"""engine.distributed on a LocalCluster against the single-process ``cpu`` backend (issue 18's table).

    python bench/distributed_vs_cpu.py [--length 16384] [--rounds 3] [--chunks 8192,4096] [--json PATH]

* exactness: every mask kind, causal, GQA, mods, uneven chunks: out and lse against one ``cpu`` call
  (targets: float32 1e-5, float64 1e-10);
* throughput: B=1, H=8, L=S=--length, head 64, causal; LocalCluster 2 workers x 1 thread against
  the cpu backend on 2 threads in this process, alternating (the order flips every round),
  median of the per-round ratios; inputs generated and persisted on the workers first, kernels
  loaded on every worker first, the distributed time ends when the output is in the workers' memory;
* scaling: the same on 1 worker x 1 thread (against cpu on 1 thread), the task and byte counts per
  merge level, and the model of docs/distributed.md fitted on 1 worker, checked on 2, extrapolated to
  8, 64 and 512 workers;
* memory: Q, K, V and output in Zarr, 4x one worker's memory_limit, Zarr to Zarr; each worker's peak
  RSS (its VmHWM, reset before the run) against its limit;
* fault: a worker process killed mid-run (SIGKILL), result compared bit for bit.

The machine is shared with other work: the ratios alternate within one run for that reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

import engine

ATOL = {"float32": 1e-5, "float64": 1e-10}


def cpu_model() -> str:
    from engine.runtime.machine import cpu_model

    return cpu_model()


def _cluster(workers, threads=1, memory_limit="auto"):
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    return Client(cluster)


def _close(client):
    cluster = client.cluster
    client.close()
    cluster.close()


# -- exactness ------------------------------------------------------------------------------------
def _alibi(score, b, h, q_idx, kv_idx, slopes):
    return score - slopes[h] * (q_idx - kv_idx)


def _window(b, h, q_idx, kv_idx, slopes):
    return abs(q_idx - kv_idx) <= 100


def exactness(client):
    import dask.array as da

    import engine.distributed as ed

    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float32", "float64"):

        def r(*shape):
            return rng.standard_normal(shape).astype(dtype)

        q, k, v = r(2, 4, 700, 32), r(2, 4, 600, 32), r(2, 4, 600, 24)
        qg, kg = r(2, 8, 700, 32), r(2, 2, 600, 32)
        vg = r(2, 2, 600, 24)
        bool_mask = rng.random((2, 1, 700, 600)) < 0.8
        float_mask = r(2, 4, 700, 600)
        uneven_q, uneven_k = (1, (3, 1), (100, 250, 350), 32), (1, (3, 1), (170, 30, 400), 32)
        cases = [
            ("no mask, uneven chunks", (q, k, v), {}, (uneven_q, uneven_k)),
            ("causal, uneven chunks", (q, k, v), {"is_causal": True}, (uneven_q, uneven_k)),
            ("bool mask (dask, chunked like the scores)", (q, k, v), {"attn_mask": bool_mask}, None),
            ("float mask", (q, k, v), {"attn_mask": float_mask}, None),
            ("GQA, 4 query heads per key head", (qg, kg, vg), {"enable_gqa": True}, None),
            (
                "score_mod + mask_mod (global indices), causal",
                (q, k, v),
                {"score_mod": _alibi, "mask_mod": _window, "mod_args": (np.linspace(0.1, 0.4, 4),), "is_causal": True},
                (uneven_q, uneven_k),
            ),
        ]
        for name, (a, b, c), kw, chunks in cases:
            gqa = kw.get("enable_gqa", False)
            qc, kc = chunks or ((1, 4 if gqa else 2, 256, a.shape[-1]), (1, 1 if gqa else 2, 200, a.shape[-1]))
            qd = da.from_array(a, chunks=qc)
            kd = da.from_array(b, chunks=kc)
            vd = da.from_array(c, chunks=kc[:-1] + (c.shape[-1],))
            kw_d = dict(kw)
            if "attn_mask" in kw:
                m = kw["attn_mask"]
                kw_d["attn_mask"] = da.from_array(m, chunks=(qc[0], 1 if m.shape[1] == 1 else qc[1], qc[2], kc[2]))
            out, lse = client.compute(
                list(ed.scaled_dot_product_attention(qd, kd, vd, return_lse=True, **kw_d)), sync=True
            )
            ref_out, ref_lse = engine.scaled_dot_product_attention(a, b, c, backend="cpu", return_lse=True, **kw)
            d_out = float(np.nanmax(np.abs(out - ref_out)))
            finite = np.isfinite(ref_lse)
            d_lse = float(np.max(np.abs(lse[finite] - ref_lse[finite]))) if finite.any() else 0.0
            same_inf = bool(np.array_equal(np.isfinite(lse), finite))
            rows.append(
                {
                    "case": name,
                    "dtype": dtype,
                    "max_abs_out": d_out,
                    "max_abs_lse": d_lse,
                    "target": ATOL[dtype],
                    "met": d_out <= ATOL[dtype] and d_lse <= ATOL[dtype] and same_inf,
                }
            )
            print(
                f"  {dtype} {name:48s} out {d_out:.1e}  lse {d_lse:.1e}  {'met' if rows[-1]['met'] else 'MISSED'}",
                flush=True,
            )
    return rows


# -- throughput and scaling -----------------------------------------------------------------------
def throughput(client, L, chunk, rounds, causal=True):
    from engine.distributed.cli import make_inputs, time_cpu, time_distributed

    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    q, k, v = make_inputs(client, 1, 8, L, L, 64, "float32", chunk, 0)
    qn, kn, vn = client.compute([q, k, v], sync=True)
    ratios, dist_s, cpu_s, record = [], [], [], None
    for r in range(rounds):
        order = ("dist", "cpu") if r % 2 == 0 else ("cpu", "dist")
        for which in order:
            if which == "dist":
                d = time_distributed(client, q, k, v, causal)
                _release(client, d.pop("out"))  # the next round computes it again
                dist_s.append(d["seconds"])
                record = d
            else:
                seconds, expected = time_cpu(qn, kn, vn, causal, threads)
                cpu_s.append(seconds)
        ratios.append(cpu_s[-1] / dist_s[-1])
        print(
            f"    round {r}: distributed {dist_s[-1]:.2f} s, cpu {cpu_s[-1]:.2f} s, ratio {ratios[-1]:.3f}", flush=True
        )
    import engine.distributed as ed

    out = client.compute(ed.scaled_dot_product_attention(q, k, v, is_causal=causal), sync=True)
    diff = float(np.max(np.abs(out - expected)))
    flops = 2 * 8 * L * L * 128 / (2 if causal else 1)
    return {
        "L": L,
        "S": L,
        "heads": 8,
        "E": 64,
        "causal": causal,
        "chunk": chunk,
        "workers_threads": threads,
        "distributed_s": dist_s,
        "cpu_s": cpu_s,
        "round_ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "max_abs_diff": diff,
        "distributed_gflops": flops / statistics.median(dist_s) / 1e9,
        "tasks": record["tasks"],
        "bytes_moved": record["bytes_moved"],
    }


def _release(client, arr):
    """Drop a persisted result from the cluster and wait until no worker holds it."""
    keys = [k for k in arr.__dask_keys__()]
    flat = []
    while keys:
        k = keys.pop()
        (keys.extend if isinstance(k, list) else flat.append)(k)
    client.cancel(arr)
    del arr
    while any(client.who_has(flat).values()):
        time.sleep(0.05)


#: assumed serial cost of one task at the scheduler (Dask documents "about 1 ms" of overhead per
#: task in total; what is left of the fitted per-task cost is counted on the workers, in parallel)
SCHEDULER_S_PER_TASK = 2e-4
#: assumed bandwidth between two workers of a cluster (10 Gb/s Ethernet)
NETWORK_BYTES_S = 1.25e9


def model(P, L, chunk, heads, t_pair_full, t_merge, per_task_s, split_every=4, causal=True, E=64):
    """Predicted seconds and efficiency of B=1, H=heads, L=S=L, chunk rows, on P one-thread workers."""
    n = math.ceil(L / chunk)
    pairs_per_head = n * (n + 1) // 2 if causal else n * n
    pairs = heads * pairs_per_head
    # merges per query row with m parts: m - 1 two-or-more-way merges at most, ceil((m-1)/(s-1))
    merges = heads * sum(
        math.ceil(max(m - 1, 0) / (split_every - 1)) for m in ((i + 1) if causal else n for i in range(n))
    )
    diag = heads * n if causal else 0
    work = (pairs - diag) * t_pair_full + diag * t_pair_full / 2 + merges * t_merge
    tasks = pairs + merges
    depth = math.ceil(math.log(max(n, 2), split_every))
    block = chunk * E * 4
    # bytes: each worker fetches the key/value blocks its pairs need (at most all of them) and
    # (P-1)/P of the pair results and partial results go to a merge on another worker
    kv_bytes = heads * n * 2 * block * min(P, n) * (P - 1) / max(P, 1)
    part_bytes = (pairs + merges) * (block + chunk * 4) * (P - 1) / max(P, 1)
    moved = kv_bytes + part_bytes
    compute = work / P + tasks * per_task_s / P + t_pair_full  # the last pair waits for no one
    critical = t_pair_full + depth * t_merge
    seconds = max(compute, critical, tasks * SCHEDULER_S_PER_TASK) + moved / (NETWORK_BYTES_S * P)
    return {
        "workers": P,
        "tasks": tasks,
        "pairs": pairs,
        "merges": merges,
        "merge_depth": depth,
        "bytes_moved": moved,
        "seconds": seconds,
        "efficiency": work / (P * seconds),
    }


# -- memory ---------------------------------------------------------------------------------------
def larger_than_memory(limit_mib=320):
    import dask.array as da

    import engine.distributed as ed
    from engine.distributed.metrics import peak_memory, reset_peak_memory

    limit = limit_mib * 2**20
    client = _cluster(2, 1, limit)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            B = limit // (4 * 512 * 64 * 4)  # each array = one worker's limit
            shape, chunks = (B, 4, 512, 64), (8, 4, 256, 64)
            rng = da.random.default_rng(0)
            for n in "qkv":
                rng.standard_normal(shape, chunks=chunks, dtype=np.float32).to_zarr(f"{tmp}/{n}.zarr", compressors=None)
            q, k, v = (da.from_zarr(f"{tmp}/{n}.zarr") for n in "qkv")
            out = ed.scaled_dot_product_attention(q, k, v, is_causal=True)
            pids = client.run(os.getpid)
            client.run(reset_peak_memory)
            start = time.perf_counter()
            out.to_zarr(f"{tmp}/out.zarr", compressors=None)
            seconds = time.perf_counter() - start
            peaks = client.run(peak_memory)
            restarted = client.run(os.getpid) != pids
            total = sum(x.nbytes for x in (q, k, v, out))
            written = da.from_zarr(f"{tmp}/out.zarr")
            b = B // 2
            diff = float(
                np.max(
                    np.abs(
                        np.asarray(written[b])
                        - engine.scaled_dot_product_attention(
                            *(np.asarray(x[b]) for x in (q, k, v)), is_causal=True, backend="cpu"
                        )
                    )
                )
            )
    finally:
        _close(client)
    return {
        "memory_limit_bytes": limit,
        "data_bytes": total,
        "data_over_limit": total / limit,
        "shape": list(shape),
        "chunks": list(chunks),
        "seconds": seconds,
        "peak_rss_bytes": sorted(peaks.values()),
        "peak_over_limit": max(peaks.values()) / limit,
        "met": max(peaks.values()) <= limit and not restarted,
        "workers_restarted": restarted,
        "max_abs_diff_one_batch_entry": diff,
    }


# -- fault ----------------------------------------------------------------------------------------
def _gate(block, path, last, block_info=None):
    if tuple(block_info[None]["chunk-location"]) == last:
        while not os.path.exists(path):
            time.sleep(0.02)
    return block


def _held(prefix, dask_scheduler=None):
    return {
        ws.address: len([ts for ts in ws.has_what if str(ts.key[0]).startswith(prefix)])
        for ws in dask_scheduler.workers.values()
    }


def killed_worker(client):
    import dask.array as da

    import engine.distributed as ed

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 8, 4096, 64)).astype(np.float32) for _ in range(3))
    qd, kd, vd = (da.from_array(x, chunks=(1, 2, 512, 64)) for x in (q, k, v))
    want = client.compute(ed.scaled_dot_product_attention(qd, kd, vd, is_causal=True), sync=True)
    with tempfile.TemporaryDirectory() as tmp:
        gate = os.path.join(tmp, "gate")
        last = tuple(len(c) - 1 for c in qd.chunks)
        out = ed.scaled_dot_product_attention(qd.map_blocks(_gate, gate, last, dtype=qd.dtype), kd, vd, is_causal=True)
        pids = client.run(os.getpid)
        future = client.compute(out)
        while True:
            held = client.run_on_scheduler(_held, out.name)
            victim = max(held, key=held.get)
            if held[victim]:
                break
            time.sleep(0.05)
        os.kill(pids[victim], signal.SIGKILL)
        while victim in client.scheduler_info()["workers"]:
            time.sleep(0.05)
        open(gate, "w").close()
        got = future.result()
    client.wait_for_workers(2)
    return {
        "blocks_held_by_killed_worker": held[victim],
        "identical_bits": bool(np.array_equal(got.view(np.uint32), want.view(np.uint32))),
    }


def refit(result, L, chunk):
    """Fit the model on the one-worker run and check it on the two-worker run, from measured
    figures only: the work W is the cpu backend on one thread (same inputs, same run), pair tasks
    share it by their flops (diagonal pairs half), and Dask's cost per task is what one worker
    spent beyond W, over the tasks; merges are counted in that cost."""
    one = result["scaling"]["one_worker"]
    two = next(t for t in result["throughput"] if t["chunk"] == chunk)
    pairs, merges = one["tasks"]["pairs"], one["tasks"]["merges"]
    diagonal = 8 * math.ceil(L / chunk)
    work = statistics.median(one["cpu_s"])
    fit = {
        "t_pair_full": work / (pairs - diagonal / 2),
        "t_merge": 0.0,
        "per_task_s": max(0.0, (statistics.median(one["distributed_s"]) - work) / (pairs + merges)),
    }
    check = model(2, L, chunk, 8, **fit)
    result["scaling"].update(
        {
            "fitted": fit,
            "check_two_workers": {
                "predicted_s": check["seconds"],
                "measured_s": statistics.median(two["distributed_s"]),
                "measured_cpu_2_threads_s": statistics.median(two["cpu_s"]),
                "predicted_bytes": check["bytes_moved"],
                "measured_bytes": two["bytes_moved"]["total"],
            },
            "model_this_L": [model(P, L, chunk, 8, **fit) for P in (1, 2, 8, 64, 512)],
            "model_L65536": [model(P, 65536, chunk, 8, **fit) for P in (1, 2, 8, 64, 512)],
            "assumptions": {"scheduler_s_per_task": SCHEDULER_S_PER_TASK, "network_bytes_s": NETWORK_BYTES_S},
        }
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunks", default="8192,4096")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: exact,speed,scaling,memory,fault")
    p.add_argument("--json", default=None)
    p.add_argument("--refit", default=None, help="recompute the model from the measured figures in this JSON file")
    args = p.parse_args(argv)
    if args.refit:
        with open(args.refit) as f:
            result = json.load(f)
        refit(result, result["throughput"][0]["L"], result["scaling"]["one_worker"]["chunk"])
        result["refit"] = "model recomputed by --refit from the measured figures of this run"
        with open(args.refit, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result["scaling"]["check_two_workers"]))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    chunks = [int(c) for c in args.chunks.split(",")]
    result = {
        "command": "python bench/distributed_vs_cpu.py " + " ".join(argv or sys.argv[1:]),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "note": "machine shared with other work while measuring",
    }
    import dask
    import distributed

    result["dask"] = dask.__version__
    result["distributed"] = distributed.__version__
    client = _cluster(2)
    try:
        if "exact" not in skip:
            print("exactness (vs one cpu call)", flush=True)
            result["exactness"] = exactness(client)
        if "speed" not in skip:
            result["throughput"] = []
            for chunk in chunks:
                print(
                    f"throughput L=S={args.length}, chunk {chunk}: 2 workers x 1 thread vs cpu on 2 threads", flush=True
                )
                result["throughput"].append(throughput(client, args.length, chunk, args.rounds))
        if "fault" not in skip:
            print("killed worker", flush=True)
            result["fault"] = killed_worker(client)
            print(f"  {result['fault']}", flush=True)
    finally:
        _close(client)
    if "scaling" not in skip and "throughput" in result:
        chunk = chunks[0]
        client = _cluster(1)
        try:
            print(f"scaling: 1 worker x 1 thread vs cpu on 1 thread, chunk {chunk}", flush=True)
            one = throughput(client, args.length, chunk, max(1, args.rounds - 1))
        finally:
            _close(client)
        result["scaling"] = {"one_worker": one}
        refit(result, args.length, chunk)
        print(json.dumps(result["scaling"]["check_two_workers"]), flush=True)
    if "memory" not in skip:
        print("Zarr to Zarr, 4x a worker's memory_limit", flush=True)
        result["memory"] = larger_than_memory()
        print(f"  {result['memory']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
