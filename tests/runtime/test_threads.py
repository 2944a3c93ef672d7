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
