"""Thread and process safety: 8 Python threads at once, and children made by fork and by spawn.

Results must be bitwise identical to a serial run: the cpu kernel gives each (batch, head,
query tile) to one task, so the thread count and the interleaving of calls must not change a bit.
The fork and spawn checks run inside a child interpreter with a timeout, so a hang or an abort
(the failure modes of unsafe threading layers) fails the test instead of freezing the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import engine

from conftest import HANG_TIMEOUT_S, TESTS, available_backends

THREADS = 8
ROUNDS = 12
#: the children's import path: this test module and the shared helpers it imports
HERE = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), TESTS])
CPU_BACKENDS = [b for b in available_backends() if b != "cuda"]


def _cases(seed=0):
    """Functional calls of several kinds (plain, causal, GQA, bool and float masks), one per thread."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(THREADS):
        dtype = np.float32 if i % 2 == 0 else np.float64
        Hq, H = (4, 2) if i % 3 == 0 else (2, 2)
        L, S = 70 + 13 * i, 130 - 7 * i
        q = rng.standard_normal((2, Hq, L, 24)).astype(dtype)
        k = rng.standard_normal((2, H, S, 24)).astype(dtype)
        v = rng.standard_normal((2, H, S, 16)).astype(dtype)
        kw = {"enable_gqa": Hq != H}
        if i % 4 == 1:
            kw["is_causal"] = True
        elif i % 4 == 2:
            kw["attn_mask"] = rng.random((L, S)) < 0.7
        elif i % 4 == 3:
            kw["attn_mask"] = rng.standard_normal((1, 1, L, S)).astype(dtype)
        cases.append((q, k, v, kw))
    return cases


def _run_threads(work):
    """Start THREADS threads on ``work(i)`` behind a barrier; re-raise the first exception."""
    errors, barrier = [], threading.Barrier(THREADS)

    def target(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eight_threads_functional_identical_to_serial(backend):
    cases = _cases()
    serial = [
        engine.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kw) for q, k, v, kw in cases
    ]
    calls = [0] * THREADS

    def work(i):
        q, k, v, kw = cases[i]
        for r in range(ROUNDS):
            # each thread walks all the cases, so every case runs concurrently with every other
            j = (i + r) % THREADS
            qj, kj, vj, kwj = cases[j]
            out, lse = engine.scaled_dot_product_attention(qj, kj, vj, backend=backend, return_lse=True, **kwj)
            np.testing.assert_array_equal(out, serial[j][0])
            np.testing.assert_array_equal(lse, serial[j][1])
            calls[i] += 1

    _run_threads(work)
    assert sum(calls) == THREADS * ROUNDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eight_threads_variant_identical_to_serial(backend):
    """One shared variant instance called from 8 threads (it must not keep per-call state)."""
    mh = engine.get_variant("multi-head", embed_dim=32, num_heads=4, seed=0)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((2, 50 + 9 * i, 32)).astype(np.float32) for i in range(THREADS)]
    pads = [rng.random((2, x.shape[1])) < 0.2 for x in xs]
    serial = [mh(x, key_padding_mask=p, need_weights=True, backend=backend) for x, p in zip(xs, pads)]

    def work(i):
        for r in range(ROUNDS):
            j = (i + r) % THREADS
            out, w = mh(xs[j], key_padding_mask=pads[j], need_weights=True, backend=backend)
            np.testing.assert_array_equal(out, serial[j][0])
            np.testing.assert_array_equal(w, serial[j][1])

    _run_threads(work)


def test_thread_count_changes_no_bit():
    """set_num_threads(1) vs all threads: identical results (the work split does not depend on it)."""
    if "cpu" not in CPU_BACKENDS:
        pytest.fail("the cpu backend must be available on every CI machine")
    q, k, v, kw = _cases()[3]
    full = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    try:
        engine.set_num_threads(1)
        one = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    finally:
        engine.set_num_threads(None)
    np.testing.assert_array_equal(one, full)


def child_work(i):
    """What the pool children of the fork/spawn test compute (module level, so spawn finds it)."""
    q, k, v, kw = _cases()[i]
    return engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)


_CHILD = r"""
import json, multiprocessing as mp, os, sys
from concurrent.futures import ProcessPoolExecutor
import numpy as np
sys.path[:0] = sys.argv[1].split(os.pathsep)
import engine, numba
from test_concurrency import child_work as work  # importable: spawn children pickle it by name

if __name__ == "__main__":
    method = sys.argv[2]
    expected = [work(i) for i in range(4)]   # the parent runs the kernels first (and starts its pool)
    layer = numba.threading_layer()
    ctx = mp.get_context(method)
    # a pool whose worker dies (an abort after fork) raises BrokenProcessPool here at once; a
    # multiprocessing.Pool replaced the worker and waited for the lost task until the timeout
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        got = list(pool.map(work, range(4), timeout=float(sys.argv[3])))
    same = all(np.array_equal(a, b) for a, b in zip(got, expected))
    print(json.dumps({"layer": layer, "identical": same, "n": len(got)}))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_process_after_parent_ran_a_kernel(method):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, HERE, method, str(HANG_TIMEOUT_S)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["identical"] and got["n"] == 4, got
    if engine.runtime.threads._use_lock:  # workqueue fallback: safe only because calls are serialised
        assert got["layer"] == "workqueue"
    else:
        assert got["layer"] in ("tbb", "omp"), got


_THREADS_IN_FORKED_CHILD = r"""
import json, os, sys, threading
import numpy as np
sys.path[:0] = sys.argv[1].split(os.pathsep)
import engine
from test_concurrency import _cases

q, k, v, kw = _cases()[2]
expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
pid = os.fork()
if pid == 0:  # child: several threads at once on the inherited runtime
    ok = []
    def t():
        ok.append(np.array_equal(engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw), expected))
    ts = [threading.Thread(target=t) for _ in range(4)]
    [x.start() for x in ts]; [x.join() for x in ts]
    os._exit(0 if ok == [True] * 4 else 3)
_, status = os.waitpid(pid, 0)
print(json.dumps({"status": status}))
"""


def test_threads_inside_a_forked_child():
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_IN_FORKED_CHILD, HERE],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"status": 0}, proc.stderr[-3000:]
