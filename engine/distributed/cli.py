"""``attention-engine distributed``: one attention problem on a Dask cluster, against one process.

With no ``--scheduler`` it starts a ``LocalCluster`` of worker processes on this machine. Inputs
are generated on the workers (random normal, seeded) and persisted first; the kernels are loaded
on every worker by a tiny warm-up call; then the attention is timed to the moment its output is
in the workers' memory. It prints the time, the task count, the bytes moved between workers (from
their transfer logs), the dashboard address, and, unless ``--no-compare``, the single-process
``cpu`` backend on the same inputs and thread count: its time, the throughput ratio and the
largest difference.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

__all__ = ["add_arguments", "run", "start_client", "make_inputs", "time_distributed", "time_cpu"]


def _at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (argparse's own error otherwise, not a traceback or
    a hang: 0 workers waited forever, a merge fan-in of 1 raised inside Dask)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        default=None,
        help="address of a running Dask scheduler (default: start a LocalCluster of worker processes here)",
    )
    p.add_argument("--workers", type=_at_least(1), default=2, help="LocalCluster worker processes (default 2)")
    p.add_argument(
        "--threads-per-worker", type=_at_least(1), default=1, help="LocalCluster threads per worker (default 1)"
    )
    p.add_argument("--memory-limit", default="auto", help="LocalCluster memory limit per worker (default auto)")
    p.add_argument("--batch", type=_at_least(1), default=1)
    p.add_argument("--heads", type=_at_least(1), default=8)
    p.add_argument("--length", type=_at_least(1), default=8192, help="L (default 8192)")
    p.add_argument("--key-length", type=_at_least(1), default=None, help="S (default L)")
    p.add_argument("--head-dim", type=_at_least(1), default=64)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument(
        "--chunk",
        type=_at_least(1),
        default=None,
        help="rows per chunk along L and S (default engine.runtime.config.DASK_CHUNK_ROWS)",
    )
    p.add_argument("--split-every", type=_at_least(2), default=None, help="fan-in of the merge tree (default 4)")
    p.add_argument("--no-compare", action="store_true", help="skip the single-process cpu run")
    p.add_argument(
        "--cpu-threads",
        type=_at_least(1),
        default=None,
        help="threads of the single-process run (default: the cluster's total threads)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")


def start_client(scheduler=None, workers=2, threads_per_worker=1, memory_limit="auto"):
    """A ``distributed.Client``: to ``scheduler``, or to a new ``LocalCluster`` of worker processes."""
    import logging

    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        memory_limit=memory_limit,
        silence_logs=logging.ERROR,
    )
    return Client(cluster)


def make_inputs(client, batch, heads, L, S, E, dtype, chunk, seed):
    """Query, key and value generated and persisted on the workers (seeded: the same every run)."""
    import dask.array as da
    from dask.distributed import wait

    from ..runtime.config import DASK_CHUNK_ROWS
    from .chunking import default_chunks

    rows = chunk or DASK_CHUNK_ROWS
    rng = da.random.default_rng(seed)
    arrays = []
    for n in (L, S, S):
        chunks = default_chunks((batch,), heads, n, target_rows=rows) + ((E,),)
        arrays.append(rng.standard_normal((batch, heads, n, E), chunks=chunks, dtype=np.dtype(dtype)))
    arrays = client.persist(arrays)
    wait(arrays)
    return arrays


def _warm():
    """In a worker: load the cpu kernel and the merge kernel (Numba's disk cache, or compile)."""
    import engine
    from engine.distributed.threads import task_threads

    for dt in (np.float32, np.float64):
        x = np.ones((1, 1, 4, 4), dt)
        with task_threads():
            o, lse = engine.scaled_dot_product_attention(x, x, x, backend="cpu", return_lse=True)
            engine.merge_attention([o, o], [lse, lse])
    return True


def time_distributed(client, q, k, v, causal, split_every=None) -> dict:
    """Time one distributed attention until its output is in memory on the workers."""
    from dask.distributed import wait

    from . import scaled_dot_product_attention
    from .metrics import task_counts, transfer_bytes

    client.run(_warm)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, split_every=split_every)
    counts = task_counts(out)
    t0 = time.time()
    start = time.perf_counter()
    out = client.persist(out)
    wait(out)
    seconds = time.perf_counter() - start
    moved = transfer_bytes(client, t0, len(counts["merges_per_level"]))
    return {"seconds": seconds, "tasks": counts, "bytes_moved": moved, "out": out}


def describe_tasks(t: dict) -> str:
    """The task counts as a sum that adds up (``engine.distributed.metrics.task_counts``)."""
    parts = [f"{t['pairs']} pairs", f"{t['merges']} merges"]
    if t["merges_per_level"]:
        parts[-1] += f" (per level {', '.join(map(str, t['merges_per_level']))})"
    for key, what in (
        ("empty", "empty blocks"),
        ("outs", "out"),
        ("lses", "lse"),
        ("specs", "spec"),
        ("other", "other"),
    ):
        if t.get(key):
            parts.append(f"{t[key]} {what}")
    return f"{t['attention']} attention tasks = {' + '.join(parts)}; {t['graph']} in the graph with the inputs"


def describe_bytes(moved: dict) -> str:
    """Bytes moved between workers, by kind; the merge results per level of the merge tree."""
    levels = moved["merge_levels"]
    if levels:
        merges = f"merge results {sum(levels) / 1e6:.1f} MB (per level {', '.join(f'{b / 1e6:.1f}' for b in levels)})"
    else:
        merges = "no merge tasks (one key chunk)"
    return (
        f"{moved['total'] / 1e6:.1f} MB between workers in {moved['transfers']} transfers (inputs "
        f"{moved['inputs'] / 1e6:.1f} MB, pair results {moved['pairs'] / 1e6:.1f} MB, {merges})"
    )


def time_cpu(q, k, v, causal, threads) -> tuple[float, np.ndarray]:
    """One call of the ``cpu`` backend in this process on ``threads`` threads: (seconds, out)."""
    import engine

    before = engine.get_num_threads()
    engine.set_num_threads(threads)
    try:
        x = np.ones((1, 1, 4, q.shape[-1]), q.dtype)
        engine.scaled_dot_product_attention(x, x, x, is_causal=causal, backend="cpu")  # kernel loaded
        start = time.perf_counter()
        out = engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")
        return time.perf_counter() - start, out
    finally:
        engine.set_num_threads(before)


def _cluster_threads(client) -> int:
    return sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())


def run(args) -> int:
    S = args.key_length or args.length
    client = start_client(args.scheduler, args.workers, args.threads_per_worker, args.memory_limit)
    try:
        info = client.scheduler_info()["workers"]
        threads = _cluster_threads(client)
        kind = "scheduler " + args.scheduler if args.scheduler else "LocalCluster (worker processes)"
        print(f"cluster      {kind}: {len(info)} workers, {threads} threads; dashboard {client.dashboard_link}")
        print(
            f"problem      B={args.batch} H={args.heads} L={args.length} S={S} E={args.head_dim} "
            f"{args.dtype}{' causal' if args.causal else ''}"
        )
        q, k, v = make_inputs(
            client, args.batch, args.heads, args.length, S, args.head_dim, args.dtype, args.chunk, args.seed
        )
        print(f"chunks       query {q.chunks[1:3]}, key {k.chunks[2]} rows")
        d = time_distributed(client, q, k, v, args.causal, args.split_every)
        t = d["tasks"]
        moved = d["bytes_moved"]
        print(f"distributed  {d['seconds']:.3f} s; {describe_tasks(t)}")
        print(f"bytes moved  {describe_bytes(moved)}")
        record = {
            "cluster": kind,
            "workers": len(info),
            "threads": threads,
            "dashboard": client.dashboard_link,
            "batch": args.batch,
            "heads": args.heads,
            "L": args.length,
            "S": S,
            "E": args.head_dim,
            "dtype": args.dtype,
            "causal": args.causal,
            "chunks_L": list(q.chunks[2]),
            "distributed_s": d["seconds"],
            "tasks": t,
            "bytes_moved": moved,
        }
        if not args.no_compare:
            cpu_threads = args.cpu_threads or threads
            qn, kn, vn, out = client.compute([q, k, v, d["out"]], sync=True)
            seconds, expected = time_cpu(qn, kn, vn, args.causal, cpu_threads)
            diff = float(np.max(np.abs(out - expected))) if out.size else 0.0
            ratio = seconds / d["seconds"]
            print(f"cpu backend  {seconds:.3f} s in this process on {cpu_threads} threads")
            print(f"ratio        distributed throughput = {ratio:.2f}x the cpu backend's; max |difference| {diff:.2e}")
            record.update(cpu_s=seconds, cpu_threads=cpu_threads, throughput_ratio=ratio, max_abs_diff=diff)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not args.scheduler:
            cluster.close()
    return 0
