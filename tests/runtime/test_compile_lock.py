"""Processes that share a Numba cache folder compile each engine kernel overload once
(``engine/runtime/compile_lock.py``): the others wait for the lock and load it from the cache.

Each case runs child interpreters on a fresh ``NUMBA_CACHE_DIR`` with the small kernel of
``merge_attention`` (a second or two to compile). The children start the call together (they wait
for a file the test creates once all have imported the engine), so without the lock both compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import engine

from conftest import HANG_TIMEOUT_S, ROOT

pytest.importorskip("fcntl", reason="no advisory file locks on this platform: every process compiles")

CHILD = r"""
import json, os, sys, time, warnings
import numpy as np
import engine
from engine.kernels.lse_merge import _merge_rows
from engine.runtime import compile_lock

go, hold = sys.argv[1], sys.argv[2] == "hold"
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 40, 8)).astype(np.float32) for _ in range(3))
parts = [engine.scaled_dot_product_attention(q, k[:, :, s], v[:, :, s], backend="reference", return_lse=True)
         for s in (slice(0, 15), slice(15, 40))]
if hold:  # another process stuck with the lock: this one waits WAIT_S, then compiles anyway
    import fcntl
    compile_lock.WAIT_S = 0.5
    args = tuple(_merge_rows.typeof_pyval(a) for a in (np.empty((2, 80, 8), np.float32), np.empty((2, 80), np.float32),
                                                      np.empty((80, 8), np.float32), np.empty(80, np.float32)))
    fd = os.open(compile_lock._lock_path(_merge_rows, args), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
if sys.argv[2] == "all-held":  # every lock held elsewhere (a stopped process holding nested locks)
    import fcntl, types
    compile_lock.WAIT_S = 0.3

    def flock(fd, op):
        raise BlockingIOError

    compile_lock.fcntl = types.SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, flock=flock)
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out, lse = engine.merge_attention([o for o, _ in parts], [l for _, l in parts])
ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")
print(json.dumps({"misses": sum(_merge_rows.stats.cache_misses.values()),
                  "hits": sum(_merge_rows.stats.cache_hits.values()),
                  "err": float(np.abs(out - ref).max()),
                  "warnings": [str(w.message) for w in caught]}))
"""


def _run_together(tmp_path, modes):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(go), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in modes
    ]
    for child in children:  # every child has imported the engine and waits for the file
        assert child.stdout.readline().strip() == "READY", child.stderr.read()
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=HANG_TIMEOUT_S)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_processes_starting_together_compile_a_kernel_once(tmp_path):
    results = _run_together(tmp_path, ["wait", "wait"])
    assert sorted(r["misses"] for r in results) == [0, 1], results  # one compiled...
    assert sorted(r["hits"] for r in results) == [0, 1], results  # ...the other loaded its result
    assert all(r["err"] < 1e-5 for r in results), results
    assert not [w for r in results for w in r["warnings"] if "compiling this kernel here as well" in w]


def test_a_lock_held_too_long_is_given_up_with_a_warning(tmp_path):
    start = time.monotonic()
    (result,) = _run_together(tmp_path, ["hold"])
    assert result["misses"] == 1 and result["err"] < 1e-5, result
    assert any("compiling this kernel here as well" in w for w in result["warnings"]), result
    assert time.monotonic() - start < HANG_TIMEOUT_S


def test_a_stuck_holder_costs_one_wait_per_call_not_one_per_nested_lock(tmp_path):
    """The kernel's callees (``_merge_row``, ``fast_exp``) compile inside it and have locks of
    their own; once this compilation has waited ``WAIT_S`` it does not wait for them again."""
    start = time.monotonic()
    (result,) = _run_together(tmp_path, ["all-held"])
    waits = [w for w in result["warnings"] if "compiling this kernel here as well" in w]
    assert result["misses"] == 1 and result["err"] < 1e-5, result
    assert len(waits) == 1, waits
    assert time.monotonic() - start < HANG_TIMEOUT_S


def test_user_functions_and_uncached_kernels_take_no_lock(tmp_path):
    import numba
    from numba import njit

    from engine.kernels.cpu import flash_fwd
    from engine.runtime import compile_lock

    plain = njit(lambda x: x)  # not the engine's, no cache
    assert compile_lock._lock_path(plain, ()) is None
    # a kernel is a driver and a task (shared by every tuple of mods) and the mods' loops (built
    # per mods): a script's mod's loop is not disk-cached; the task and every driver are
    closure_mod = flash_fwd.flash_kernel(None, lambda b, h, q, k: q >= k)
    mask_loop = closure_mod.loops.loops_for(numba.typeof(()))[1]
    assert mask_loop is not None and compile_lock._lock_path(mask_loop, ()) is None
    no_mods = flash_fwd.flash_kernel(None, None)
    assert closure_mod.task is no_mods.task
    for cached in (no_mods.task, no_mods.via, closure_mod.via):
        if cached._cache.__class__.__name__ == "FunctionCache":  # caching on (the default)
            path = compile_lock._lock_path(cached, ())
            assert path.endswith(".lock") and os.path.dirname(path) == cached._cache._cache_path
    assert np.isfinite(compile_lock.WAIT_S)


def test_threads_asking_for_the_same_mods_get_one_kernel():
    """Dask's threads specialise a kernel on the same mod at once: one kernel, compiled once."""
    import threading

    from engine.kernels.cpu import flash_fwd

    def window(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= 3

    barrier = threading.Barrier(8)
    got = []

    def ask():
        barrier.wait()
        got.append(flash_fwd.flash_kernel(None, window, serial=True))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded machine may
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(got) == 8 and len({id(k) for k in got}) == 1


def test_one_overload_per_dtype_whatever_the_flags_and_the_mask_layout():
    """A read-only q/k/v and a writeable one, a whole mask ("C") and a broadcast one ("A") run one
    compiled forward and one backward overload (``runtime.entry_points.canonical_entry``), with
    the reference's results, through the first call and the call plan alike."""
    from engine.kernels.cpu import flash_bwd, flash_fwd

    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 3, 20, 8))
    read_only = q.copy()
    read_only.flags.writeable = False
    full = rng.standard_normal((2, 3, 20, 20))
    broadcast = np.broadcast_to(rng.standard_normal((20, 20)), (2, 3, 20, 20))
    masks = [None, full, broadcast, full > 0, broadcast > 0]
    kernels = [flash_fwd.flash_kernel(None, None, serial=s) for s in (True, False)] + [
        flash_bwd.backward_kernel(None, None, None)
    ]
    before = [set(k.signatures) for k in kernels]
    for x in (q, read_only):
        for mask in masks:
            ref, ref_lse = engine.scaled_dot_product_attention(
                x, x, x, attn_mask=mask, backend="reference", return_lse=True
            )
            for _ in range(2):  # the first call, then the plan's
                out, lse = engine.scaled_dot_product_attention(x, x, x, attn_mask=mask, backend="cpu", return_lse=True)
                np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
            grads = [
                engine.scaled_dot_product_attention_backward(np.ones_like(ref), x, x, x, out, lse, mask, backend=b)
                for b in ("cpu", "reference")
            ]
            for g, e in zip(*grads):
                np.testing.assert_allclose(g, e, rtol=0, atol=1e-10)
    new = [set(k.signatures) - b for k, b in zip(kernels, before)]
    assert all(len(n) <= 1 for n in new), new
    for n in new[:2]:  # a forward overload compiled here is the read-only one
        assert all(not t.mutable for sig in n for t in sig[0].types[:3]), n


LAYER_CHILD = r"""
import collections, json
import numpy as np, numba
from numba import njit, prange
from engine.runtime.entry_points import canonical_entry
from engine.runtime.threads import configure_threading_layer

Args = collections.namedtuple("Args", "q out")


@njit(parallel=True)
def double(a):
    q, out = a.q, a.out  # (a write to a.out[i] inside the prange loop is lost: Numba's parfors)
    for i in prange(q.shape[0]):
        out[i] = q[i] * 2


a = Args(np.ones(1000), np.empty(1000))
canonical_entry(double, (a,))(a)  # the process's first parallel compilation, outside any kernel call
print(json.dumps({"layer": numba.threading_layer(), "configured": configure_threading_layer(),
                  "ok": bool((a.out == 2).all())}))
"""


def test_a_first_compilation_through_canonical_entry_starts_the_engines_threading_layer():
    """Compiling a parallel kernel starts Numba's thread pool; ``canonical_entry`` compiles before
    the kernel call (and its guard), so it must pin the engine's layer first (TBB where it loads).
    Once it did not: Numba then chose GNU OpenMP, and a process that forked after a first call hung."""
    res = subprocess.run(
        [sys.executable, "-c", LAYER_CHILD],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ok"] and got["layer"] == got["configured"], got
