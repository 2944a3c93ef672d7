"""Data larger than a worker's memory: Q, K, V and the output in Zarr, together twice each
worker's ``memory_limit`` (4x in ``bench/distributed_vs_cpu.py``), from Zarr to Zarr, with no worker above its limit.
The peak is each
worker's own: the kernel's resident-set high-water mark (VmHWM), reset just before the run."""

import logging
import os

import numpy as np
import pytest

import engine

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")
pytest.importorskip("zarr", reason="the dask extra is not installed")

import engine.distributed as ed  # noqa: E402

pytestmark = pytest.mark.xdist_group("dask")

#: seconds before a hung computation fails the test (it takes about 20 s on a loaded 2-core machine)
WAIT_S = 600
MEMORY_LIMIT = 320 * 2**20
#: (batch, heads, L = S, head size) float32: each array 160 MiB, the four 2x a worker's limit
#: (the benchmark runs 4x; this is kept short)...
SHAPE = (1280, 4, 128, 64)
#: ... read and written 32 sequences at a time (2 query chunks and 2 key chunks each: merges too)
CHUNKS = (32, 4, 64, 64)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
        f.write("5")


def _peak_bytes():
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def small_memory_client():
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit=MEMORY_LIMIT,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_zarr_to_zarr_larger_than_a_workers_memory(small_memory_client, tmp_path):
    client = small_memory_client
    rng = da.random.default_rng(0)
    paths = {n: str(tmp_path / f"{n}.zarr") for n in ("q", "k", "v", "out")}
    for n in ("q", "k", "v"):  # written by the workers, chunk by chunk
        rng.random(SHAPE, chunks=CHUNKS, dtype=np.float32).to_zarr(paths[n], compressors=None)
    q, k, v = (da.from_zarr(paths[n]) for n in ("q", "k", "v"))
    out = ed.scaled_dot_product_attention(q, k, v, is_causal=True)

    pids = client.run(os.getpid)
    client.run(_reset_peak)
    # a worker paused at 80% of its limit with memory it cannot spill would wait forever: a hang
    # becomes a failure after WAIT_S
    client.compute(out.to_zarr(paths["out"], compressors=None, compute=False)).result(timeout=WAIT_S)
    peaks = client.run(_peak_bytes)

    total = sum(x.nbytes for x in (q, k, v, out))
    assert total >= 2 * MEMORY_LIMIT, (total, MEMORY_LIMIT)
    assert client.run(os.getpid) == pids  # no worker was restarted (the nanny kills at 95%)
    assert all(p <= MEMORY_LIMIT for p in peaks.values()), {w: p / 2**20 for w, p in peaks.items()}

    # the output: a few batch entries against one single-process call
    written = da.from_zarr(paths["out"])
    for b in (0, 517, SHAPE[0] - 1):
        qb, kb, vb = (np.asarray(x[b]) for x in (q, k, v))
        np.testing.assert_allclose(
            np.asarray(written[b]),
            engine.scaled_dot_product_attention(qb, kb, vb, is_causal=True, backend="cpu"),
            rtol=0,
            atol=1e-5,
        )
