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
    """Tasks in the graph of ``arrays`` (dask arrays from ``engine.distributed``): ``attention``
    (all the engine's tasks) is the sum of ``pairs`` ((query chunk, key chunk) tasks), ``merges``
    (``merges_per_level``), ``empty`` (blocks that see no key), ``outs`` and ``lses`` (one per
    output block), ``specs`` (the call's shared arguments) and ``other`` (anything else the
    engine's layers hold, e.g. a rechunk of the result); ``graph`` counts everything, inputs too."""
    graph = {}
    for a in arrays:
        graph.update(dict(a.__dask_graph__()))
    kinds: Counter = Counter()
    levels: Counter = Counter()
    for k in graph:
        name = _name(k)
        if not name.startswith("attention-"):
            continue
        kind = name.split("-")[1]
        if kind == "merge":
            if k[1] == "empty":
                kind = "empty"
            else:
                levels[k[1]] += 1
        kinds[kind if kind in ("pair", "merge", "empty", "out", "lse", "spec") else "other"] += 1
    return {
        "pairs": kinds["pair"],
        "merges": kinds["merge"],
        "merges_per_level": [levels[i] for i in sorted(levels)],
        "empty": kinds["empty"],
        "outs": kinds["out"],
        "lses": kinds["lse"],
        "specs": kinds["spec"],
        "other": kinds["other"],
        "attention": sum(kinds.values()),
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


def transfer_bytes(client, since: float, merge_levels: int = 0) -> dict:
    """Bytes fetched from worker to worker since ``since`` (``time.time()`` on this machine):
    ``total``, ``inputs`` (blocks of the query, key, value, mask), ``pairs`` (pair results sent to
    a merge), ``merge_levels`` (partial results of merge level 0, 1, ... sent on: one entry per
    level of the graph's merge tree, ``merge_levels`` of them, 0 where nothing moved),
    ``transfers``."""
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
        "merge_levels": [levels[i] for i in range(max([merge_levels] + [k + 1 for k in levels if isinstance(k, int)]))],
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
