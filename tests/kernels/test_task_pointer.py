"""Kernels with mods share one driver and one task per argument types; the task calls the mods'
own loops through their addresses (``engine.kernels.task_pointer``, ``engine.kernels.mod_calls``):
each tuple of mods gets its own result, and what a mod raises reaches the caller as before."""

import numpy as np
import pytest
from numba import typeof

import engine
from engine.kernels.cpu import flash_fwd
from engine.kernels.task_pointer import TaskKernel

from conftest import randn
from testmods import causal_mod, linear_bias, skip_every_third_key


def test_mods_of_the_same_argument_types_share_one_driver_and_one_task_and_keep_their_own_loops(rng):
    # mods and shapes whose loops other tests compile already (disk-cached for every worker); the
    # backward and decode kernels take the same path in their own tests
    q, k, v = randn(rng, (2, 2, 5, 8)), randn(rng, (2, 2, 13, 8)), randn(rng, (2, 2, 13, 8))
    cases = [
        (
            dict(score_mod=linear_bias, mask_mod=skip_every_third_key),
            dict(score_mod=linear_bias, attn_mask=np.arange(13) % 3 != 1),
        ),
        (dict(mask_mod=causal_mod), dict(is_causal=True)),
    ]
    for mods, same in cases:
        out = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **mods)
        want = engine.scaled_dot_product_attention(q, k, v, backend="reference", **same)
        np.testing.assert_allclose(out, want, atol=2e-6, err_msg=str(mods))
    built = {key: k for key, k in flash_fwd._with_mods.items() if isinstance(k, TaskKernel)}
    assert len(built) >= len(cases)
    # every kernel runs one of at most two drivers (parallel, serial) and the one task, each with
    # one overload per argument types: the tuples of mods compiled neither of their own
    assert len({id(k.via) for k in built.values()}) <= 2
    assert {k.task for k in built.values()} == {flash_fwd._flash_task}
    # the mods' loops: one set per tuple of mods (its serial and parallel kernels share it), each its own
    loops: dict = {}
    for key, k in built.items():
        loops.setdefault(key[:-1], set()).add(k.loops)
    assert all(len(b) == 1 for b in loops.values())
    with_mods = [b for key, b in loops.items() if any(m is not None for m in key)]
    assert len({id(b) for bs in with_mods for b in bs}) == len(with_mods) >= len(cases)
    # a loop is built for each mod given: a score loop and a mask loop, or the mask loop alone
    built_loops = {tuple(d is not None for d in b.loops_for(typeof(()))) for bs in with_mods for b in bs}
    assert {(True, True), (False, True)} <= built_loops


def test_an_exception_a_mods_task_raises_reaches_the_caller(rng):
    from testmods import raising_mod

    # a serial call, and a parallel one (where Numba reports a SystemError caused by the mod's
    # exception; the kernel re-raises the mod's own), forward and backward (always parallel)
    for shape in ((1, 1, 8, 4), (2, 8, 64, 16)):
        q = randn(rng, shape)
        with pytest.raises(ValueError, match="raised by the mod"):
            engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=raising_mod)
    out, lse = engine.scaled_dot_product_attention(q, q, q, backend="cpu", return_lse=True)
    with pytest.raises(ValueError, match="raised by the mod"):
        engine.scaled_dot_product_attention_backward(out, q, q, q, out, lse, backend="cpu", score_mod=raising_mod)


def _raises_on_every_thread_count(rng, match, **mods):
    """The call raises the mod's ValueError on one thread and on all of them."""
    q = randn(rng, (2, 8, 256, 16))
    for threads in sorted({1, engine.get_num_threads()}):
        engine.set_num_threads(threads)
        try:
            with pytest.raises(ValueError, match=match):
                engine.scaled_dot_product_attention(q, q, q, backend="cpu", **mods)
        finally:
            engine.set_num_threads(None)


def test_an_exception_raised_in_a_worker_thread_is_not_lost(rng):
    """Numba drops an exception a parallel loop's worker thread raises (the call returned a wrong
    result, and a decode call kept its cache writes): the trampoline sets a flag, and the kernel
    runs again on its serial build, where the mod's exception propagates."""
    from testmods import raising_in_batch_1

    _raises_on_every_thread_count(rng, "mod in batch 1", score_mod=raising_in_batch_1)


def test_an_exception_a_mask_mod_raises_in_the_tile_map_reaches_the_caller(rng):
    """The mask_mod's tile map is a parallel kernel of its own: its exception is the mod's own (not
    Numba's SystemError), also when a worker thread raised it (the tile stays unset, and the
    serial build runs again)."""
    from testmods import mask_raising_in_batch_1

    _raises_on_every_thread_count(rng, "mask_mod in batch 1", mask_mod=mask_raising_in_batch_1)


WORKQUEUE_SCRIPT = """
import numpy as np, numba, engine
from testmods import mask_raising_in_batch_1, raising_in_batch_1
q = np.random.default_rng(0).standard_normal((2, 8, 256, 16)).astype(np.float32)
engine.set_num_threads(2)
for kw in ({"score_mod": raising_in_batch_1}, {"mask_mod": mask_raising_in_batch_1}):
    try:
        engine.scaled_dot_product_attention(q, q, q, backend="cpu", **kw)
        print("no exception", kw)
    except ValueError as e:
        print("ValueError", e)
print(numba.threading_layer())
"""


def test_worker_thread_exceptions_under_the_workqueue_layer(tmp_path):
    """Numba's workqueue layer runs a parallel loop in a worker thread even when set to one
    thread: a flagged call runs again on the serial build, where the mod's exception propagates
    (the tile map's exception was lost there, and the call returned a wrong result)."""
    import os
    import subprocess
    import sys

    from conftest import HANG_TIMEOUT_S, TESTS

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", PYTHONPATH=TESTS)
    res = subprocess.run(
        [sys.executable, "-c", WORKQUEUE_SCRIPT], capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "workqueue", lines
    want = ["ValueError raised by the mod in batch 1", "ValueError raised by the mask_mod in batch 1"]
    assert lines[:2] == want, lines


def test_the_failure_flag_is_set_when_a_task_raises():
    """What the worker-thread case relies on, checked on the calling thread: the trampoline's call
    sets the flag byte (passed by address) when the task raises, and propagates the exception."""
    from numba import njit, types

    from engine.kernels.task_pointer import _call_task, _new_flag

    @njit
    def task(i):
        if i == 3:
            raise ValueError("task 3")

    @njit
    def drive(address, failed, n):
        for i in range(n):
            _call_task(address, failed, np.int64(i))

    task.compile((types.int64,))
    compiled = task.overloads[(types.int64,)]
    address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
    failed, flag_address, _view = _new_flag()
    drive(address, flag_address, 3)
    assert failed[0] == 0
    with pytest.raises(ValueError, match="task 3"):
        drive(address, flag_address, 5)
    assert failed[0] == 1
