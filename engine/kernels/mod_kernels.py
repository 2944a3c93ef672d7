"""A kernel's task re-built with the caller's mods bound as globals, memoised per process (the
forward, backward, decoding and varlen kernels of the ``cpu`` backend share this); its driver is
shared by every tuple of mods (``engine.kernels.task_pointer``).

The mods are globals of the compiled code, not arguments: Numba then calls them directly (inlined,
vectorised), and the kernel without mods loads from Numba's disk cache (a function argument would
put a function type in the signature, which never matches after unpickling). Kernels with mods
whose module :func:`~engine.kernels.specialise.cache_tag` accepts (the built-in variants' and the
engine's) have their task disk-cached under a name tagged by it; tasks of other mods are compiled
once per process.
"""

import threading

from numba import njit

from .specialise import cache_tag, named
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
    per-task function it calls through a global of the same name; ``defaults`` maps the task's
    globals that hold the mods (``_SCORE_MOD``...) to what they hold without one; ``options`` are
    the njit options of both (without ``parallel``/``cache``).

    ``kernels(*mods, serial=False)`` gives the kernel for these mods (in the order of
    ``defaults``; ``None`` for "none"): a :class:`~engine.kernels.task_pointer.TaskKernel`, the
    task (``task`` itself when every mod is None, else the task re-built over the mods, once per
    process per tuple) called through its address by one driver per kernel and ``serial``
    (compiled once per argument types and disk-cached, whatever the mods). So a new tuple of mods
    compiles its task only, not a driver that links the task and optimises it again (4 of a
    parallel forward's 9.5 s, 1 of a serial one's 6.5, on an Intel Xeon), and the kernel without
    mods compiles its task once for the serial and the parallel driver (cold, both: 12.5 -> 8.5 s).
    ``built`` holds them. ``task_types`` (``(args type, mod_args type) -> the task's argument
    types``) says what the driver passes the task.
    """

    def __init__(self, driver, task, defaults: dict, options: dict, *, task_types):
        self.driver = driver
        self.task = task
        self.defaults = defaults
        self.options = options
        self.task_types = task_types
        self.built: dict = {}
        self._tasks: dict = {}
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
            task = self.task if all(m is None for m in mods) else self._tasks.get(mods)
            if task is None:
                tag = cache_tag(*mods)
                cache = {"cache": True} if tag else {}
                fn = self.task.py_func
                bound = {name: mod or default for (name, default), mod in zip(self.defaults.items(), mods)}
                env = dict(fn.__globals__, **bound)
                task = self._tasks[mods] = njit(**self.options, **cache)(
                    named(fn.__code__, env, fn.__name__ + "_mods", tag)
                )
            kernel = self.built[key] = TaskKernel(self._driver(serial), task, self.task_types, self._serial_driver)
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
