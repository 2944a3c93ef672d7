"""A worker process killed in the middle of a distributed attention costs a recomputation only:
the result is the same, bit for bit (deterministic tasks, a merge tree fixed at build time)."""

import os
import signal
import time

import numpy as np
import pytest

import engine

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")

import engine.distributed as ed  # noqa: E402

pytestmark = pytest.mark.xdist_group("dask")

#: seconds to wait for a state of the cluster before calling the test hung
WAIT_S = 600


def _gate(block, path, last, block_info=None):
    """One block (``last``) waits until the test opens the gate (creates ``path``), so the
    computation is surely under way, and not finished, when the worker dies. One block only:
    a waiting task holds its worker's one thread."""
    if tuple(block_info[None]["chunk-location"]) == last:
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
    return block


def _held(prefix, dask_scheduler=None):
    """Per worker: the keys whose name starts with ``prefix`` that it holds in memory."""
    return {
        ws.address: [ts.key for ts in ws.has_what if str(ts.key[0]).startswith(prefix)]
        for ws in dask_scheduler.workers.values()
    }


def _times_in_memory(keys, dask_scheduler=None):
    """How often the scheduler saw each key reach memory (2 = computed twice)."""
    return [sum(1 for entry in dask_scheduler.story(key) if entry[2] == "memory") for key in keys]


def _bits(x):
    return x.view(np.uint32 if x.dtype == np.float32 else np.uint64)


def test_killed_worker_gives_the_same_bits(dask_process_client, tmp_path):
    client = dask_process_client
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 2, 96, 16)).astype(np.float32) for _ in range(3))
    chunks = (1, 1, 12, 16)
    qd, kd, vd = (da.from_array(x, chunks=chunks) for x in (q, k, v))
    kw = dict(is_causal=True, return_lse=True, split_every=3)

    # the result without a fault, on the same cluster
    want_out, want_lse = client.compute(list(ed.scaled_dot_product_attention(qd, kd, vd, **kw)), sync=True)
    np.testing.assert_allclose(
        want_out, engine.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu"), rtol=0, atol=1e-5
    )

    # the same problem again (new keys: the query passes through a gate), and a worker killed
    gate = tmp_path / "gate"
    last = tuple(len(c) - 1 for c in qd.chunks)
    q_gated = qd.map_blocks(_gate, str(gate), last, dtype=qd.dtype)
    out, lse = ed.scaled_dot_product_attention(q_gated, kd, vd, **kw)
    pids = client.run(os.getpid)
    futures = client.compute([out, lse])
    deadline = time.monotonic() + WAIT_S
    while True:
        held = client.run_on_scheduler(_held, out.name)
        victim = max(held, key=lambda w: len(held[w]))
        if held[victim] and not gate.exists():
            break
        assert time.monotonic() < deadline, f"no output block finished in {WAIT_S} s: {held}"
        time.sleep(0.05)
    lost = held[victim]
    os.kill(pids[victim], signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while victim in client.scheduler_info()["workers"]:  # the scheduler notices the loss
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gate.touch()
    got_out, got_lse = client.gather(futures)

    assert np.array_equal(_bits(got_out), _bits(want_out))
    assert np.array_equal(_bits(got_lse), _bits(want_lse))
    # the blocks the dead worker held were computed again, not found elsewhere
    assert min(client.run_on_scheduler(_times_in_memory, lost)) >= 2, lost
    assert pids[victim] not in client.run(os.getpid).values()
    client.wait_for_workers(2, timeout=WAIT_S)  # the nanny brings a new worker up for later tests
