"""Threads inside Dask tasks: a worker with T threads keeps T cores busy, never more.

Dask runs one task per worker thread, so the parallelism is Dask's: each task's kernels run on
one Numba thread (:func:`engine.runtime.threads.thread_limit`, per Python thread, so the caller's own
``engine.set_num_threads`` is untouched) and BLAS on one thread. The BLAS limit is process-wide,
so it is set (with threadpoolctl, once per process) only in worker processes started by a Dask
nanny, which are Dask's own (their environment already asks for it: the nanny starts them with
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` = 1); workers running
inside the caller's process (``LocalCluster(processes=False)``, the threaded scheduler) leave the
caller's BLAS as it is.
"""

from __future__ import annotations

import contextlib
import threading

from ..runtime.threads import thread_limit

__all__ = ["task_threads", "TASK_THREADS"]

#: Numba threads (and BLAS threads, in worker processes) of one task
TASK_THREADS = 1

_blas_limited = False
_lock = threading.Lock()


def _in_worker_process() -> bool:
    """True inside a task on a Dask worker started by a nanny (a process of its own)."""
    try:
        from distributed import get_worker
    except ImportError:  # pragma: no cover - distributed is part of the dask extra
        return False
    try:
        worker = get_worker()
    except ValueError:  # not in a worker task
        return False
    return getattr(worker, "nanny", None) is not None


def _limit_blas_once() -> None:
    global _blas_limited
    if _blas_limited:
        return
    with _lock:
        if not _blas_limited and _in_worker_process():
            import threadpoolctl

            threadpoolctl.threadpool_limits(TASK_THREADS, user_api="blas")
        _blas_limited = True


@contextlib.contextmanager
def task_threads():
    """Around a task's kernel calls: one Numba thread on this Python thread; BLAS at one thread
    in Dask worker processes (set once per process)."""
    _limit_blas_once()
    with thread_limit(TASK_THREADS):
        yield
