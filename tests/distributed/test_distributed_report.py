"""What ``attention-engine distributed`` reports: task counts that add up (it printed "49 attention
(24 pairs, 8 merges)") and the bytes of every merge level, zeros included (it printed "merge
levels [] MB"). Graphs are built, not run: no cluster is needed."""

import re

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")
import engine.distributed as ed  # noqa: E402
from engine.distributed.metrics import task_counts, transfer_bytes  # noqa: E402


def describe_tasks(t):
    from engine.distributed.cli import describe_tasks

    return describe_tasks(t)


def describe_bytes(moved):
    from engine.distributed.cli import describe_bytes

    return describe_bytes(moved)


def _lagged(b, h, q_idx, kv_idx):
    return kv_idx + 40 <= q_idx  # the first query chunk (rows 0-31) sees no key at all


CALLS = {
    "causal, out only": lambda q: (ed.scaled_dot_product_attention(q, q, q, is_causal=True),),
    "causal, out and lse": lambda q: ed.scaled_dot_product_attention(q, q, q, is_causal=True, return_lse=True),
    "two merge levels": lambda q: (ed.scaled_dot_product_attention(q, q, q, split_every=2),),
    "blocks that see nothing": lambda q: ed.scaled_dot_product_attention(q, q, q, mask_mod=_lagged, return_lse=True),
    "one key chunk": lambda q: (ed.scaled_dot_product_attention(q, q[..., :32, :], q[..., :32, :]),),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_task_counts_add_up(call):
    q = da.zeros((1, 4, 96, 8), chunks=(1, 1, 32, 8))
    arrays = CALLS[call](q)
    t = task_counts(*arrays)
    parts = ("pairs", "merges", "empty", "outs", "lses", "specs", "other")
    assert sum(t[p] for p in parts) == t["attention"], t
    assert sum(t["merges_per_level"]) == t["merges"]
    graph = {}
    for a in arrays:
        graph.update(dict(a.__dask_graph__()))
    assert t["attention"] == sum(1 for k in graph if str(k[0] if isinstance(k, tuple) else k).startswith("attention-"))
    text = describe_tasks(t)
    numbers = [int(n) for n in re.findall(r"(\d+) (?:pairs|merges|empty blocks|out|lse|spec|other)\b", text)]
    assert int(text.split()[0]) == sum(numbers) == t["attention"], text
    if call == "two merge levels":
        assert "(per level 12, 12)" in text  # 12 blocks of 3 key chunks, fan-in 2
    if call == "blocks that see nothing":
        assert t["empty"] > 0
    if call == "one key chunk":
        assert t["merges"] == 0 and t["merges_per_level"] == []


class _NoTransfers:
    """A client whose workers moved nothing (everything ran where its inputs were)."""

    def run(self, fn):
        return {"worker-1": [], "worker-2": []}


def test_bytes_of_every_merge_level_even_when_nothing_moved():
    moved = transfer_bytes(_NoTransfers(), since=0.0, merge_levels=2)
    assert moved["merge_levels"] == [0, 0] and moved["total"] == 0
    text = describe_bytes(moved)
    assert "[]" not in text and "merge results 0.0 MB (per level 0.0, 0.0)" in text
    assert "no merge tasks" in describe_bytes(transfer_bytes(_NoTransfers(), since=0.0))


def test_bytes_by_level_from_the_transfer_log():
    class Client:
        def run(self, fn):
            kinds = [("attention-merge-x", 1, 300), ("attention-pair-x", None, 200), ("x-input", None, 50)]
            return {"w": [{"stop": 10.0, "kinds": kinds}, {"stop": 1.0, "kinds": [("attention-pair-x", None, 999)]}]}

    moved = transfer_bytes(Client(), since=5.0, merge_levels=2)
    assert moved == {"total": 550, "inputs": 50, "pairs": 200, "merge_levels": [0, 300], "transfers": 1}
    assert np.isclose(sum(moved["merge_levels"]) + moved["pairs"] + moved["inputs"], moved["total"])
