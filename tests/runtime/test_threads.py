"""Concurrent calls from several Python threads: correct results, no abort; the thread count knob."""

import os
import threading

import numpy as np
import pytest

import engine


def test_two_threads_calling_cpu_at_once_get_correct_results():
    rng = np.random.default_rng(0)
    cases = [tuple(rng.standard_normal((2, 4, 200, 32)).astype(np.float32) for _ in range(3)) for _ in range(2)]
    expected = [engine.scaled_dot_product_attention(*c, backend="reference") for c in cases]
    errors, barrier = [], threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(20):
                out = engine.scaled_dot_product_attention(*cases[i], backend="cpu")
                np.testing.assert_allclose(out, expected[i], atol=2e-5)
        except Exception as exc:  # reported below; a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_set_num_threads():
    import numba

    before = engine.get_num_threads()
    try:
        engine.set_num_threads(1)
        assert engine.get_num_threads() == 1
        q = np.ones((1, 1, 8, 4), np.float32)
        engine.scaled_dot_product_attention(q, q, q, backend="cpu")
        with pytest.raises(ValueError, match="num_threads must be an int in 1.."):
            engine.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)
    finally:
        engine.set_num_threads(None)
    assert engine.get_num_threads() == before


def test_threading_layer_is_thread_safe():
    import numba

    q = np.ones((1, 1, 8, 4), np.float32)
    engine.scaled_dot_product_attention(q, q, q, backend="cpu")
    assert numba.threading_layer() in ("tbb", "omp") or engine.runtime.threads._use_lock


def test_blas_and_torch_threads_are_this_workers_share_of_the_cores():
    """pytest-xdist workers must not oversubscribe the cores: OpenBLAS's and OpenMP's threads spin
    while they wait, so two workers each running a 2-thread BLAS on 2 cores crawl (conftest pins them)."""
    import threadpoolctl
    import torch

    from conftest import THREADS_PER_WORKER

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    assert THREADS_PER_WORKER == max(1, (os.cpu_count() or 1) // workers)
    pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] in ("blas", "openmp")]
    assert any(p["user_api"] == "blas" for p in pools), pools
    assert all(p["num_threads"] <= THREADS_PER_WORKER for p in pools), pools
    assert torch.get_num_threads() <= THREADS_PER_WORKER


STARTED_FIRST = r"""
import json, threading, warnings
import numba, numpy as np

numba.config.THREADING_LAYER = {layer!r}  # what the user's own code asked for ("default": Numba's pick)
numba.set_num_threads(1)  # the user's own Numba code starts the thread pool before the engine loads
started = numba.threading_layer()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine
import engine.runtime.threads as threads

q = np.random.default_rng(0).standard_normal((1, 2, 300, 16)).astype(np.float32)
want = engine.scaled_dot_product_attention(q, q, q, backend="reference")
bad = []


def work():  # two Python threads at once: serialised where the layer needs it, never an abort
    for _ in range(5):
        out = engine.scaled_dot_product_attention(q, q, q, backend="cpu")
        bad.append(float(abs(out - want).max()) > 1e-4)


ts = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"started": started, "engine": threads.numba_layer(), "lock": threads._use_lock,
                  "warned": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                  "bad": any(bad)}))
"""

STARTED_AFTER = r"""
import engine, numba
numba.set_num_threads(1)  # after `import engine`: the layer the engine chose at import
import engine.runtime.threads as threads
print(numba.threading_layer(), threads._layer)
"""


def _child(code, **extra_env):
    import subprocess
    import sys

    from conftest import HANG_TIMEOUT_S, ROOT

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["PYTHONPATH"] = ROOT
    env.update(extra_env)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_numba_threads_started_before_import_engine_keep_their_layer_and_the_engine_says_so(layer):
    """A pool started by the user's Numba code cannot change layer: the engine must run on the layer
    it really has (it once believed TBB, so under ``workqueue`` two threads could abort the process)
    and warn where that layer is not TBB (GNU OpenMP: fork hangs, milliseconds waiting for a worker
    after a NumPy BLAS call)."""
    import json

    got = json.loads(_child(STARTED_FIRST.replace("{layer!r}", repr(layer))))
    assert got["engine"] == got["started"], got
    assert got["lock"] == (got["started"] == "workqueue"), got
    warned = [w for w in got["warned"] if "before the engine could choose TBB" in w]
    # no warning where the user chose the layer (here in code): only for Numba's own pick
    assert bool(warned) == (got["started"] != "tbb" and layer == "default"), got
    if warned:
        assert repr(got["started"]) in warned[0]
    assert not got["bad"], got


def test_numba_threads_started_after_import_engine_run_the_engines_layer():
    started, chosen = _child(STARTED_AFTER).split()
    assert started == chosen, (started, chosen)


CHOSEN = r"""
import json, threading, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine
import numba
import engine.runtime.threads as threads

q = np.random.default_rng(0).standard_normal((2, 4, 256, 32)).astype(np.float32)
want = engine.scaled_dot_product_attention(q, q, q, backend="reference")
bad = []


def work():
    for _ in range(5):
        bad.append(float(abs(engine.scaled_dot_product_attention(q, q, q, backend="cpu") - want).max()) > 1e-4)


ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"running": numba.threading_layer(), "engine": threads._layer, "lock": threads._use_lock,
                  "warned": [str(w.message) for w in caught], "bad": any(bad)}))
"""


@pytest.mark.parametrize("layer", ["tbb", "safe", "forksafe", "threadsafe", "workqueue"])
def test_a_layer_chosen_with_numba_threading_layer_loads_and_four_threads_never_abort(layer):
    """The user's NUMBA_THREADING_LAYER: TBB is preloaded for it too (``tbb`` and ``safe`` failed
    to load in a pip venv), the engine runs on what the name resolves to, and serialises its calls
    where that is ``workqueue`` (``forksafe`` may resolve to it: it once aborted four threads)."""
    import json

    got = json.loads(_child(CHOSEN, NUMBA_THREADING_LAYER=layer))
    assert got["engine"] == got["running"], got
    assert got["lock"] == (got["running"] == "workqueue"), got
    assert not got["warned"] and not got["bad"], got
    if layer in ("tbb", "safe"):
        assert got["running"] == "tbb", got


IN_CODE = r"""
import numba
numba.config.THREADING_LAYER = "omp"  # Numba's documented alternative to the environment variable
import numpy as np
import engine
import engine.runtime.threads as threads
q = np.ones((1, 2, 64, 16), np.float32)
engine.scaled_dot_product_attention(q, q, q, backend="cpu")
print(numba.config.THREADING_LAYER, numba.threading_layer(), threads._layer)
"""


def test_a_layer_chosen_in_code_before_import_engine_is_kept():
    pytest.importorskip("numba.np.ufunc.omppool", reason="Numba's omp layer does not load here")
    assert _child(IN_CODE).split() == ["omp", "omp", "omp"]


FORK_AFTER_IMPORT = r"""
import os
import numba, numpy as np
import engine  # with the user's NUMBA_THREADING_LAYER=omp: must not start GNU OpenMP's pool


@numba.njit(parallel=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s


pid = os.fork()
if pid == 0:
    os._exit(0 if total(np.ones(1000)) == 1000 else 3)
print(os.waitpid(pid, 0)[1])
"""


def test_import_engine_starts_no_pool_so_a_child_forked_after_it_runs_openmp():
    """Starting the pool at import (to learn what a chosen layer resolves to) made GNU OpenMP kill
    a child forked after ``import engine`` ("fork() called from a process already using GNU
    OpenMP"); the layer is now resolved as Numba resolves it, without starting anything."""
    pytest.importorskip("numba.np.ufunc.omppool", reason="Numba's omp layer does not load here")
    assert _child(FORK_AFTER_IMPORT, NUMBA_THREADING_LAYER="omp") == "0"


FORK_WHILE_LOCKED = r"""
import os, signal, threading, time
import numpy as np
import engine

q = np.random.default_rng(0).standard_normal((2, 4, 256, 32)).astype(np.float32)
engine.scaled_dot_product_attention(q, q, q)
stop = False


def busy():  # another thread inside engine calls (holding the workqueue lock) when the fork comes
    while not stop:
        engine.scaled_dot_product_attention(q, q, q)


t = threading.Thread(target=busy)
t.start()
time.sleep(0.05)
codes = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a child that waits on the inherited lock is killed, not left hanging
        engine.scaled_dot_product_attention(q, q, q)
        os._exit(0)
    codes.append(os.waitpid(pid, 0)[1])
stop = True
t.join()
print(codes)
"""


def test_a_child_forked_while_another_thread_holds_the_workqueue_lock_is_not_left_waiting():
    """Under ``workqueue`` the engine's calls take a lock; a child forked while another thread held
    it inherited it held and its first call waited forever (every child, in a trial)."""
    assert _child(FORK_WHILE_LOCKED, NUMBA_THREADING_LAYER="workqueue") == "[0, 0, 0]"


PRIORITY = r"""
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine
import engine.runtime.threads as threads
print(threads._layer, threads._use_lock, len([w for w in caught if "names no threading layer" in str(w.message)]))
"""


def test_numbas_priority_order_and_an_unknown_layer_name_are_the_users_choice():
    # NUMBA_THREADING_LAYER_PRIORITY reorders Numba's default: kept (the engine once pinned TBB)
    assert _child(PRIORITY, NUMBA_THREADING_LAYER_PRIORITY="workqueue omp tbb").split() == ["workqueue", "True", "0"]
    # a name Numba does not know: a warning at import, not only Numba's error at the first call
    assert _child(PRIORITY, NUMBA_THREADING_LAYER="bogus").split() == ["bogus", "True", "1"]


WHERE = r"""
import importlib, warnings
import numba
numba.set_num_threads(1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    importlib.import_module("engine")  # line 7
print([(w.filename, w.lineno) for w in caught if "before the engine could choose" in str(w.message)])
"""


def test_the_started_first_warning_points_at_the_users_import_line():
    """Past the engine's and importlib's frames (through ``importlib.import_module`` it pointed at
    importlib's own file)."""
    got = _child(WHERE)
    if got == "[]":
        pytest.skip("Numba's own pick here is TBB: no warning to place")
    assert got == "[('<string>', 7)]", got
