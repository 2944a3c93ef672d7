"""Numba's threading layer and the thread count of the ``cpu`` backend.

The layer is pinned to TBB at ``import engine`` (Numba fixes it when its pool starts, which the
user's own Numba code may do too): the only one of Numba's layers that is safe both when several
Python threads call a parallel kernel at once (``workqueue`` aborts the process) and in a child
forked after the parent ran a kernel (GNU OpenMP hangs there). A layer the user chose, or a pool
their code started first, is kept (:func:`configure_threading_layer`). pip installs
``libtbb.so.12`` into ``<prefix>/lib``, off the loader's path, so it is preloaded from there. If
TBB cannot be loaded, the engine falls back to ``workqueue`` and serialises kernel calls with a
lock, so it stays safe, only less parallel across Python threads.

Sharing the cores with torch: after a parallel op, torch's OpenMP workers (GNU OpenMP, bundled in
its wheels) spin for a while before they sleep (``GOMP_SPINCOUNT``: 300000 spins, about 3 ms by
libgomp's estimate, 0.5-20 ms by CPU), and a parallel kernel started meanwhile shares its cores
with them. :func:`quiet_openmp` asks every GNU OpenMP runtime loaded in the process to let the
calling thread's idle workers go (``omp_pause_resource_all(omp_pause_soft)``, the OpenMP 5.0
routine made for this: the runtime starts them again at its next parallel region, which costs it
tens of microseconds). The ``cpu`` forward op calls it before a large parallel kernel; it acts only
on the calling thread's own pool (libgomp's pools are per thread), so a torch op running on
another Python thread is not touched. It does nothing under Numba's ``omp`` layer (it would stop
the engine's own workers), where no GNU OpenMP runtime is loaded, or in a child made by
``os.fork`` (GNU OpenMP cannot be called safely there: the pause hung).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
import threading
import warnings

__all__ = [
    "configure_threading_layer",
    "kernel_call_guard",
    "set_num_threads",
    "get_num_threads",
    "thread_limit",
    "quiet_openmp",
]

_configured = False
_layer = ""  # the layer configure_threading_layer found or chose
_serialise = threading.Lock()
_use_lock = False
_num_threads: int | None = None


class _PerThread(threading.local):
    """Per Python thread: a limit set by ``thread_limit`` (Dask tasks), which wins over
    ``_num_threads``. The class default makes reading it cheap where none is set (``getattr``
    with a default on a missing attribute raises and catches an AttributeError: 0.3 us, read on
    every call)."""

    limit: int | None = None


_local = _PerThread()


def _preload_tbb() -> bool:
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for lib in sorted(glob.glob(os.path.join(prefix, "lib", "libtbb.so.12*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    return False


def configure_threading_layer() -> str:
    """Pin Numba's threading layer before its thread pool starts; return the layer the engine runs
    on (called at ``import engine``).

    A layer the user chose (``NUMBA_THREADING_LAYER``, or ``numba.config.THREADING_LAYER`` set in
    code) is respected: TBB is preloaded all the same (a pip venv's ``libtbb`` is off the loader's
    path, so ``tbb`` or ``safe`` could not load otherwise), and the layer the choice resolves to
    (``forksafe`` may give ``workqueue``) is found as Numba finds it, without starting the pool. A
    pool the user's own Numba code started before keeps its layer, with a warning unless it is TBB.
    Calls are serialised across Python threads on ``workqueue``, which aborts on concurrent calls.
    """
    global _configured, _use_lock, _layer
    import numba

    if _configured:
        return numba_layer()
    _configured = True
    started = _started_layer()
    if started is None:
        _preload_tbb()
    # the user's choice: NUMBA_THREADING_LAYER or numba.config set in code, or Numba's order of
    # preference changed (NUMBA_THREADING_LAYER_PRIORITY) for its default
    choice = str(numba.config.THREADING_LAYER).lower()
    chosen = choice != "default" or tuple(numba.config.THREADING_LAYER_PRIORITY) != ("tbb", "omp", "workqueue")
    if started is not None:  # the user's own Numba code started the pool first: it stays on its layer
        layer = started
        if started != "tbb" and not chosen:
            _warn_started_first(started)
    elif chosen:  # (not started here: a pool started at import made GNU OpenMP kill forked children)
        layer = _resolved_layer(choice)
        if layer not in _BACKEND_MODULES:
            warnings.warn(
                f"attention-engine: NUMBA_THREADING_LAYER (or numba.config.THREADING_LAYER) is "
                f"{numba.config.THREADING_LAYER!r}, which names no threading layer that loads here "
                "(tbb, omp, workqueue, or safe, threadsafe, forksafe, default): Numba will raise at "
                "the first parallel call",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
    else:
        try:
            import numba.np.ufunc.tbbpool  # noqa: F401  (raises if libtbb cannot be loaded)

            layer = "tbb"
        except ImportError as exc:
            warnings.warn(
                f"attention-engine: TBB threading layer unavailable ({exc}); using "
                "'workqueue' with calls serialised across Python threads",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
            layer = "workqueue"
        numba.config.THREADING_LAYER = layer
    # a layer not known to be thread-safe (not started, or the abort-prone workqueue): serialise
    _use_lock = layer not in ("tbb", "omp")
    _layer = layer
    return layer


#: the layers Numba tries, in order, for a purpose named in NUMBA_THREADING_LAYER (Numba's own
#: resolution, ``numba.np.ufunc.parallel._launch_threads``)
_PURPOSES = {
    "safe": ("tbb",),
    "threadsafe": ("tbb", "omp"),
    "forksafe": ("tbb", "workqueue") if sys.platform.startswith("linux") else ("tbb", "omp", "workqueue"),
}
_BACKEND_MODULES = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}


def _resolved_layer(choice: str) -> str:
    """The layer Numba's pool will start on for ``choice`` (a layer, a purpose or ``default``): the
    first of its candidates whose module loads; the choice itself where none does (Numba then
    raises its own error at the first parallel call)."""
    import importlib

    import numba

    candidates = _PURPOSES.get(choice) or (
        tuple(numba.config.THREADING_LAYER_PRIORITY) if choice == "default" else (choice,)
    )
    for name in candidates:
        try:
            importlib.import_module(f"numba.np.ufunc.{_BACKEND_MODULES[name]}")
            return name
        except (ImportError, KeyError):
            continue
    return choice


def _warn_started_first(started: str) -> None:
    warnings.warn(
        f"attention-engine: Numba's threads were started on its {started!r} threading layer "
        "before the engine could choose TBB (numba.set_num_threads, numba.get_num_threads or a "
        "parallel=True function ran before `import engine`). The engine runs on it"
        + (
            ", with its own calls serialised across Python threads (a parallel function of yours "
            "running at the same time as an engine call can still abort the process)"
            if started == "workqueue"
            else "; on 'omp' a child forked after a kernel call can hang or be killed by GNU OpenMP, "
            "and a parallel call right after a NumPy (OpenBLAS) product can wait milliseconds for a worker"
        )
        + ". Import engine before starting Numba's threads, or choose a layer yourself with "
        "NUMBA_THREADING_LAYER.",
        RuntimeWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the import machinery (``importlib`` included)
    and this project's packages (``engine``, ``variants``): the user's import line, whichever
    module imported first."""
    import importlib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ours = (
        os.path.join(root, "engine") + os.sep,
        os.path.join(root, "variants") + os.sep,
        os.path.dirname(importlib.__file__) + os.sep,  # importlib.import_module's own frame
    )
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith("<frozen importlib"):  # (warnings skips these frames when it counts)
            frame = frame.f_back
            continue
        if not name.startswith(ours):
            return level
        frame, level = frame.f_back, level + 1
    return 2


class _KernelCallGuard:
    """The context manager :func:`kernel_call_guard` returns (a class, not a generator: entering
    and leaving cost well under a microsecond, which matters for small calls)."""

    __slots__ = ()

    def __enter__(self):
        if not _configured:
            configure_threading_layer()
        if _use_lock:
            _serialise.acquire()
        n = _local.limit or _num_threads or _total_threads or _numba_total_threads()
        # setting costs microseconds; reading the calling thread's count through Numba's own C
        # function does not (Numba's count is per Python thread, so it is checked each time)
        if _current_threads() != n:
            import numba

            numba.set_num_threads(n)
        return self

    def __exit__(self, *exc):
        if _use_lock:
            _serialise.release()
        return False


_GUARD = _KernelCallGuard()


def kernel_call_guard() -> _KernelCallGuard:
    """Around every parallel kernel call: applies the thread count, serialises where unsafe.

    Numba's thread count is per Python thread, so it is checked (and set if different) on the
    calling thread each time.
    """
    return _GUARD


_total_threads: int | None = None


def _numba_total_threads() -> int:
    """``NUMBA_NUM_THREADS`` (fixed once Numba is imported), read once: it is asked on every call."""
    global _total_threads
    if _total_threads is None:
        import numba

        _total_threads = numba.config.NUMBA_NUM_THREADS
    return _total_threads


def _current_threads() -> int:
    """The calling thread's Numba thread count. The first call launches Numba's threads through
    the public reader, after which its C function (no checks) exists and replaces this one."""
    global _current_threads
    import numba

    n = numba.get_num_threads()
    try:
        from numba.np.ufunc.parallel import _get_num_threads
    except ImportError:  # another Numba: keep the public reader
        _get_num_threads = numba.get_num_threads
    _current_threads = _get_num_threads
    return n


def _check_count(n) -> None:
    import numba

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(
            f"num_threads must be an int in 1..{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS), got {n!r}"
        )


def set_num_threads(n: int | None) -> None:
    """Threads the ``cpu`` backend uses (``None``: all of Numba's, ``NUMBA_NUM_THREADS``).

    :param n: threads, >= 1 and at most ``NUMBA_NUM_THREADS``; None for all.
    """
    global _num_threads

    if n is not None:
        _check_count(n)
    _num_threads = n


@contextlib.contextmanager
def thread_limit(n: int):
    """Within the block, kernels called from *this* Python thread use ``n`` threads; other
    threads and the process-wide :func:`set_num_threads` are untouched.

    For task schedulers that run one task per thread (Dask): each task's kernels stay on its
    own share of the cores. ``ValueError`` unless ``1 <= n <= NUMBA_NUM_THREADS``.
    """
    _check_count(n)
    before = _local.limit
    _local.limit = n
    try:
        yield
    finally:
        _local.limit = before


def get_num_threads() -> int:
    """Threads the next ``cpu`` kernel call from this Python thread will use."""
    return _local.limit or _num_threads or _total_threads or _numba_total_threads()


#: omp_pause_resource_all of every GNU OpenMP runtime found, and len(sys.modules) when looked for
_omp_pauses: list = []
_omp_seen_modules = -1
#: set in a child made by ``os.fork``: GNU OpenMP is not fork-safe, and a call into it there (the
#: pause below) hangs when the parent's pool was busy at the fork (found by a trial: a torch op,
#: then ``os.fork()``, then the engine's first large call in the child never returned)
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child, _serialise, _omp_lock
    _forked_child = True
    # a lock held by another of the parent's threads at the fork stays held in the child, whose
    # first call then waited forever (found by a trial on workqueue); the child starts unlocked
    _serialise = threading.Lock()
    _omp_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_omp_lock = threading.Lock()
_OMP_PAUSE_SOFT = 1  # omp_pause_soft (omp.h)


def _find_gnu_openmp() -> list:
    """``omp_pause_resource_all`` of each loaded libgomp (torch's own copy, and any other), from
    /proc/self/maps (no library is loaded here that was not already)."""
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if os.path.basename(path).startswith("libgomp"):
                    paths.add(path)
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: the same handle
        except (OSError, AttributeError):  # an older libgomp (before GCC 9) has no pause routine
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int]
        found.append(fn)
    return found


def quiet_openmp() -> int:
    """Let the calling thread's idle GNU OpenMP workers go (see the module docstring); returns how
    many runtimes were asked. Looks for runtimes again whenever modules were imported since."""
    global _omp_pauses, _omp_seen_modules
    if not _configured or _forked_child or _layer == "omp":
        return 0
    n = len(sys.modules)
    if n != _omp_seen_modules:
        with _omp_lock:
            if n != _omp_seen_modules:
                _omp_pauses = _find_gnu_openmp()
                _omp_seen_modules = n
    for pause in _omp_pauses:
        pause(_OMP_PAUSE_SOFT)
    return len(_omp_pauses)


def _started_layer() -> str | None:
    """The layer Numba's thread pool runs on, or None before it starts (a layer cannot change
    once started: Numba starts its pool on the first parallel compilation or thread-count call)."""
    from numba.np.ufunc import parallel

    if not getattr(parallel, "_is_initialized", False):
        return None
    return parallel.threading_layer()


def numba_layer() -> str:
    """Numba's threading layer: the one its pool runs on once started, else the one chosen
    (``tbb`` unless the user set another)."""
    import numba

    return _started_layer() or numba.config.THREADING_LAYER
