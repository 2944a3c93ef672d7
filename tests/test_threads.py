"""Concurrent calls from several Python threads: correct results, no abort; the thread count knob."""
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
    assert numba.threading_layer() in ("tbb", "omp") or engine.threads._use_lock
