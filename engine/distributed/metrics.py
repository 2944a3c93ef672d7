"""What a distributed attention cost: its tasks, and the bytes the workers moved between them.

Bytes moved are read from each worker's own transfer log (``Worker.transfer_incoming_log``: one
entry per fetch of keys from another worker, with each key's size), so they count exactly the
data that crossed between workers, grouped by what it was: input blocks, pair results, or the
partial results of each merge level.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["task_counts", "transfer_bytes", "reset_peak_memory", "peak_memory"]


def _name(key) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


def task_counts(*arrays) -> dict:
    """Tasks in the graph of ``arrays`` (dask arrays from ``engine.distributed``): ``pairs``
    ((query chunk, key chunk) tasks), ``merges`` (per level), ``attention`` (all the engine's
    tasks: spec, pairs, merges, empty blocks, out and lse) and ``graph`` (everything, inputs too)."""
    graph = {}
    for a in arrays:
        graph.update(dict(a.__dask_graph__()))
    pairs = sum(1 for k in graph if _name(k).startswith("attention-pair-"))
    levels = Counter(k[1] for k in graph if _name(k).startswith("attention-merge-") and k[1] != "empty")
    attention = sum(1 for k in graph if _name(k).startswith("attention-"))
    return {
        "pairs": pairs,
        "merges": sum(levels.values()),
        "merges_per_level": [levels[i] for i in sorted(levels)],
        "attention": attention,
        "graph": len(graph),
    }


def _incoming_log(dask_worker=None):
    return [
        {
            "stop": e["stop"],
            "keys": {repr(k): int(n) for k, n in e["keys"].items()},
            "kinds": [
                (_name(k), k[1] if isinstance(k, tuple) and len(k) > 1 else None, int(n)) for k, n in e["keys"].items()
            ],
        }
        for e in list(dask_worker.transfer_incoming_log)
    ]


def transfer_bytes(client, since: float) -> dict:
    """Bytes fetched from worker to worker since ``since`` (``time.time()`` on this machine):
    ``total``, ``inputs`` (blocks of the query, key, value, mask), ``pairs`` (pair results sent to
    a merge), ``merge_levels`` (partial results of merge level 0, 1, ... sent on), ``transfers``."""
    total = inputs = pairs = transfers = 0
    levels: Counter = Counter()
    for entries in client.run(_incoming_log).values():
        for e in entries:
            if e["stop"] < since:
                continue
            transfers += 1
            for name, level, n in e["kinds"]:
                total += n
                if name.startswith("attention-pair-"):
                    pairs += n
                elif name.startswith("attention-merge-"):
                    levels[level] += n
                else:
                    inputs += n
    return {
        "total": total,
        "inputs": inputs,
        "pairs": pairs,
        "merge_levels": [levels[i] for i in sorted(k for k in levels if isinstance(k, int))],
        "transfers": transfers,
    }


def reset_peak_memory():
    """In a worker (``client.run``): reset this process's resident-set high-water mark (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory() -> int:
    """In a worker (``client.run``): this process's resident-set high-water mark, in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
