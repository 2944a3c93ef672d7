"""A kernel of the ``cpu`` backend for each tuple of mods, memoised per process (the forward,
backward, decoding and varlen kernels share this): one driver and one task for every tuple
(``engine.kernels.task_pointer``), and the mods' loops built per tuple
(``engine.kernels.mod_calls``).

The mods are globals of their loops' compiled code, not arguments: Numba then calls them directly
(inlined, vectorised), and the kernel without mods loads from Numba's disk cache (a function
argument would put a function type in the signature, which never matches after unpickling). Loops
of mods whose module :func:`~engine.kernels.specialise.cache_tag` accepts (the built-in variants'
and the engine's) are disk-cached under a name tagged by it; other mods' loops are compiled once
per process.
"""

import threading

from numba import njit

from .mod_calls import BoundLoops
from .specialise import named
from .task_pointer import TaskKernel, via_driver

__all__ = ["ModKernels", "serial_version"]


def serial_version(driver, options: dict, cache: bool):
    """``driver``'s code compiled without ``parallel`` (``prange`` runs as ``range``), under the
    name ``<driver>_serial``: for calls too small to pay for waking the thread pool (whose spinning
    workers also slow the Python code that runs right after a parallel call on a busy machine)."""
    fn = driver.py_func
    return njit(cache=cache, **options)(named(fn.__code__, fn.__globals__, fn.__name__ + "_serial", None))


class ModKernels:
    """The variants of one parallel kernel for each tuple of mods.

    ``driver`` is the kernel without mods (an ``njit(parallel=True)`` dispatcher) and ``task`` the
    per-task function it calls through a global of the same name; ``defaults`` maps the mod
    globals (``_SCORE_MOD``...) to what they hold without one; ``options`` are the njit options
    (without ``parallel``/``cache``); ``loops`` the kernel's mod loops
    (:class:`~engine.kernels.mod_calls.ModLoop`, written over those globals).

    ``kernels(*mods, serial=False)`` gives the kernel for these mods (in the order of
    ``defaults``; ``None`` for "none"): a :class:`~engine.kernels.task_pointer.TaskKernel`, the
    task called through its address by one driver per kernel and ``serial``, both compiled once
    per argument types and disk-cached, whatever the mods; the task calls the mods' loops, built
    once per process per tuple of mods (:class:`~engine.kernels.mod_calls.BoundLoops`), through
    their addresses. So a new tuple of mods compiles its loops only (a fraction of a second), not
    the task (5.5-9 s a kernel on an AMD Zen 4) nor a driver that links the task and optimises it
    again. ``built`` holds the kernels. ``task_types`` (``(args type, task mod_args type) -> the
    task's argument types``) says what the driver passes the task.
    """

    def __init__(self, driver, task, defaults: dict, options: dict, *, task_types, loops: tuple):
        self.driver = driver
        self.task = task
        self.defaults = defaults
        self.options = options
        self.task_types = task_types
        self.loops = loops
        self.built: dict = {}
        self._loops: dict = {}
        self._via: dict = {}
        # threads that ask for the same mods at once (Dask's) get one kernel, compiled once
        self._lock = threading.Lock()

    def __call__(self, *mods, serial: bool = False):
        key = mods + (serial,)
        kernel = self.built.get(key)
        if kernel is None:
            with self._lock:
                return self._build(mods, key, serial)
        return kernel

    def _build(self, mods: tuple, key: tuple, serial: bool):
        kernel = self.built.get(key)
        if kernel is None:
            bound = self._loops.get(mods)
            if bound is None and any(m is not None for m in mods):
                bound = self._loops[mods] = BoundLoops(self.loops, dict(zip(self.defaults, mods)), self.options)
            via, n = self._driver(serial), len(self.loops)
            kernel = TaskKernel(via, self.task, self.task_types, self._serial_driver, loops=bound, n_loops=n)
            self.built[key] = kernel
        return kernel

    def _driver(self, serial: bool):
        via = self._via.get(serial)
        if via is None:
            via = self._via[serial] = via_driver(self.driver, self.task, self.options, serial)
        return via

    def _serial_driver(self):
        """The serial driver, which a flagged parallel call runs again on (``TaskKernel``)."""
        with self._lock:
            return self._driver(True)
