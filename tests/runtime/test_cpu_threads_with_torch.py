"""The ``cpu`` forward sharing the cores with torch (``engine.runtime.threads.quiet_openmp``): before a
large parallel kernel it lets the calling thread's idle GNU OpenMP workers (torch's) go. Checked
where that could break: torch's next parallel ops, a child forked after both ran, Dask worker
processes, and many Python threads mixing torch ops and engine calls at once. No timing here
(``bench/cpu_vs_torch.py`` reports the engine right after a torch call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import engine
from engine.runtime import threads as rt_threads

from conftest import HANG_TIMEOUT_S

torch = pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))


def _inputs(seed=0, L=160):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 4, L, 32)).astype(np.float32) for _ in range(3)]


@pytest.fixture
def quiet_always(monkeypatch):
    """Every parallel forward call lets OpenMP workers go (not only large ones)."""
    import engine.backends.cpu.forward as fwd

    monkeypatch.setattr(fwd, "CPU_QUIET_OPENMP_MIN_WORK", 0)
    monkeypatch.setattr(fwd, "CPU_SERIAL_MAX_WORK", 0)


def _gnu_openmp_in_torch() -> bool:
    with open("/proc/self/maps") as f:
        return any("libgomp" in line for line in f)


def test_torch_runtime_is_found_and_its_ops_still_right(quiet_always):
    before = torch.get_num_threads()  # (given back: later tests in this worker check the pin)
    torch.set_num_threads(2)
    a = torch.randn(300, 300, dtype=torch.float64)
    expected_mm = (a.numpy() @ a.numpy()).copy()
    q, k, v = _inputs()
    expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    engine.set_num_threads(2)
    try:
        for _ in range(20):  # torch op, engine call (workers let go), torch op (workers back) ...
            assert np.allclose(torch.mm(a, a).numpy(), expected_mm)
            np.testing.assert_array_equal(engine.scaled_dot_product_attention(q, k, v, backend="cpu"), expected)
    finally:
        engine.set_num_threads(None)
        torch.set_num_threads(before)
    asked = rt_threads.quiet_openmp()
    if _gnu_openmp_in_torch():
        assert asked >= 1
    else:  # a torch built on another OpenMP: nothing is asked
        assert asked == 0


def test_nothing_is_asked_under_numbas_omp_layer(monkeypatch):
    monkeypatch.setattr(rt_threads, "_layer", "omp")  # the layer configure_threading_layer found
    assert rt_threads.quiet_openmp() == 0


_FORK = r"""
import json, os, sys
import numpy as np, torch
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # this folder and tests/ (conftest)
import engine
import engine.backends.cpu.forward as fwd
from test_cpu_threads_with_torch import _inputs
fwd.CPU_QUIET_OPENMP_MIN_WORK = 0
torch.set_num_threads(2); engine.set_num_threads(2)
a = torch.randn(200, 200)
torch.mm(a, a)
q, k, v = _inputs()
torch.mm(a, a)
expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu")  # lets torch's workers go
pid = os.fork()
if pid == 0:  # the child: torch and the engine again, alternating
    ok = True
    for _ in range(5):
        torch.mm(a, a)
        ok &= bool(np.array_equal(engine.scaled_dot_product_attention(q, k, v, backend="cpu"), expected))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(json.dumps({"status": status}))
"""


def test_child_forked_after_torch_and_the_engine_ran():
    """A child forked after a torch op and an engine call runs both. (A child forked right after a
    parallel torch op hangs in its own first parallel torch op: GNU OpenMP's team does not survive
    fork. Here the engine call between them let that team go, so the child's torch starts a new
    one.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _FORK, HERE], capture_output=True, text=True, timeout=HANG_TIMEOUT_S, cwd=HERE
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"status": 0}, proc.stderr[-3000:]


_FORK_AFTER_TORCH = r"""
import json, os, sys
import numpy as np, torch
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
import engine
import engine.backends.cpu.forward as fwd
from test_cpu_threads_with_torch import _inputs
fwd.CPU_QUIET_OPENMP_MIN_WORK = 0
fwd.CPU_SERIAL_MAX_WORK = 0
torch.set_num_threads(2); engine.set_num_threads(2)
q, k, v = _inputs()
expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
a = torch.randn(200, 200)
torch.mm(a, a)  # torch's parallel op last: its OpenMP team is busy or spinning at the fork
pid = os.fork()
if pid == 0:  # the child: the engine only (its pause of OpenMP workers hung here)
    ok = all(np.array_equal(engine.scaled_dot_product_attention(q, k, v, backend="cpu"), expected) for _ in range(3))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(json.dumps({"status": status}))
"""


def test_child_forked_right_after_a_torch_op_runs_the_engine():
    """The engine does not call into GNU OpenMP in a forked child (``quiet_openmp`` is off
    there): found by a trial, where the child's first large call hung in the pause."""
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_AFTER_TORCH, HERE],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"status": 0}, proc.stderr[-3000:]


def test_many_python_threads_mixing_torch_and_engine(quiet_always):
    """Each thread has its own OpenMP pool in libgomp and lets only its own go."""
    q, k, v = _inputs(1)
    expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    a = torch.randn(128, 128, dtype=torch.float64)
    expected_mm = a.numpy() @ a.numpy()
    errors, barrier = [], threading.Barrier(6)

    def work():
        try:
            barrier.wait()
            for _ in range(8):
                assert np.allclose(torch.mm(a, a).numpy(), expected_mm)
                np.testing.assert_array_equal(engine.scaled_dot_product_attention(q, k, v, backend="cpu"), expected)
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in ts]
    [t.join(timeout=HANG_TIMEOUT_S) for t in ts]
    assert not any(t.is_alive() for t in ts), "a thread hung"
    if errors:
        raise errors[0]


def _dask_task(seed):
    """Run in a Dask worker process: torch ops and engine calls alternating."""
    import torch

    import engine.backends.cpu.forward as fwd

    fwd.CPU_QUIET_OPENMP_MIN_WORK = 0
    fwd.CPU_SERIAL_MAX_WORK = 0
    a = torch.randn(100, 100)
    q, k, v = _inputs(seed)
    outs = []
    for _ in range(3):
        torch.mm(a, a)
        outs.append(engine.scaled_dot_product_attention(q, k, v, backend="cpu"))
    return outs[-1], all(np.array_equal(o, outs[0]) for o in outs)


@pytest.mark.xdist_group("dask")
def test_dask_worker_processes(dask_process_client):
    futures = dask_process_client.map(_dask_task, [0, 1, 2, 3], pure=False)
    got = dask_process_client.gather(futures, errors="raise")
    for seed, (out, same) in enumerate(got):
        assert same
        np.testing.assert_allclose(
            out, engine.scaled_dot_product_attention(*_inputs(seed), backend="reference"), rtol=1e-4, atol=1e-5
        )
