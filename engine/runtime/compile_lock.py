"""One compilation per kernel and signature across the processes that share a Numba cache folder.

Numba's disk cache is filled after a compilation ends, so processes that start together (pytest-xdist
workers, Dask worker processes, a script and its ``multiprocessing`` children) each compile the
same kernel for the same argument types, for seconds each, and write the same cache entry. Here
the first process to need an engine kernel's overload holds an exclusive lock (``fcntl.flock``) on
a file beside the cache index while it compiles and saves it; the others wait for the lock, then
find the overload in the cache and load it (Numba's own ``Dispatcher.compile`` looks there first).

* Only the engine's own kernels with a disk cache take part (``cache=True`` and a module under
  ``engine``); a user's ``njit`` functions compile as Numba compiles them.
* The lock is taken inside Numba's global compiler lock, so one thread per process holds file
  locks at a time, and a kernel's lock is held while its callees are compiled: those take their own
  locks, in call order (callee after caller), so two processes cannot wait for each other.
* A process that dies releases its locks (the kernel does). A lock held for longer than
  :data:`WAIT_S` (a process stopped in a debugger) is given up with a warning: this process then
  compiles on its own, as without the lock, and does not wait again for the locks of that
  kernel's callees (the stopped process may hold them too), so a stuck holder costs one
  :data:`WAIT_S` per kernel a call compiles, not one per nested lock.
* The wait happens inside Numba's global compiler lock, as a compilation does: while this process
  waits, its other threads cannot compile either (they would wait for Numba's lock during a
  compilation here all the same). Hence a :data:`WAIT_S` of minutes, not ten: a few times the
  longest compilation measured (the backward with mods, 12 s of CPU, 20-30 s on a loaded machine).
* Without ``fcntl`` (Windows) nothing changes.

The lock files are empty and stay in the cache folder (``<index name>-<signature hash>.lock``):
deleting one while another process waits on it would let a third process compile at once.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, every process compiles for itself
    fcntl = None

__all__ = ["install", "WAIT_S"]

#: seconds a process waits for another's compilation of the same overload before it compiles too
WAIT_S = 120.0
_POLL_S = 0.02
#: compilations in progress in this process (nested: a kernel's callees), and whether a wait of
#: this outermost compilation has timed out; both only change under Numba's global compiler lock
_depth = 0
_gave_up = False


def _lock_path(dispatcher, args) -> str | None:
    """The lock file of this dispatcher's overload for ``args``, or None when it takes no lock."""
    cache = getattr(dispatcher, "_cache", None)
    impl = getattr(cache, "_impl", None)
    cache_file = getattr(cache, "_cache_file", None)
    if impl is None or cache_file is None:  # NullCache: no disk cache
        return None
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    if module != "engine" and not module.startswith("engine."):
        return None
    digest = hashlib.sha256(repr(args).encode()).hexdigest()[:16]
    return os.path.join(cache._cache_path, f"{cache_file._index_name}-{digest}.lock")


def _acquire(path: str):
    """An open, locked file descriptor of ``path``, or None (no lock: cannot open, or timed out)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        return None
    global _gave_up
    deadline = time.monotonic() + (0.0 if _gave_up else WAIT_S)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if _gave_up:  # a wait of this compilation already timed out: no second one
                os.close(fd)
                return None
            if time.monotonic() > deadline:
                _gave_up = True
                os.close(fd)
                warnings.warn(
                    f"attention-engine: another process has held {path} for over {WAIT_S:.0f} s; "
                    "compiling this kernel here as well",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            time.sleep(_POLL_S)
        except OSError:  # a file system without locks
            os.close(fd)
            return None


def install() -> None:
    """Wrap ``numba.core.dispatcher.Dispatcher.compile`` once per process (see the module)."""
    if fcntl is None:
        return
    from numba.core import sigutils
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.dispatcher import Dispatcher

    if getattr(Dispatcher.compile, "_attention_engine_locked", False):
        return
    compile_ = Dispatcher.compile

    def compile(self, sig):
        global _depth, _gave_up
        with global_compiler_lock:
            args, _ = sigutils.normalize_signature(sig)
            path = None if tuple(args) in self.overloads else _lock_path(self, args)
            fd = _acquire(path) if path else None
            _depth += 1
            try:
                return compile_(self, sig)  # loads the overload if the lock's last holder saved it
            finally:
                _depth -= 1
                if _depth == 0:
                    _gave_up = False  # the next call's compilation waits again
                if fd is not None:
                    os.close(fd)  # releases the lock

    compile._attention_engine_locked = True
    Dispatcher.compile = compile
