"""Holding SciPy's OpenBLAS at one thread while the ``cpu`` kernels run (their parallel tasks each
call BLAS on their own core)."""

from __future__ import annotations

import ctypes
import threading

__all__ = ["get_blas_pin"]


class _BlasPin:
    """Holds SciPy's OpenBLAS (the BLAS of ``np.dot`` inside Numba kernels) at one thread while any
    kernel call runs, so each parallel task's GEMM runs on its own core and tiles can be larger
    than OpenBLAS's multithreading threshold (17% faster at L = 4096 than 64 x 64 tiles).

    OpenBLAS's thread count is process-wide (its ``_local`` setter is too), so calls are counted:
    the first to enter saves and sets 1, the last to leave restores. Meanwhile SciPy BLAS calls
    from other Python threads also run on one thread: slower, never wrong. ``available`` is False
    when the setter cannot be found; tiles then stay under the threshold instead.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None
        self._get = self._set = None
        self.available = False
        try:
            import scipy.linalg.cython_blas as cython_blas

            lib = ctypes.CDLL(cython_blas.__file__)  # dlsym also searches its OpenBLAS dependency
            for prefix in ("scipy_", ""):
                try:
                    self._get = getattr(lib, prefix + "openblas_get_num_threads")
                    self._set = getattr(lib, prefix + "openblas_set_num_threads")
                    break
                except AttributeError:
                    continue
            self.available = self._set is not None
        except (ImportError, OSError):
            pass

    def __call__(self) -> "_BlasPin":
        """The pin as a context manager (a class, not a generator: cheaper to enter and leave)."""
        return self

    def __enter__(self):
        if self.available:
            with self._lock:
                if self._users == 0:
                    self._saved = self._get()
                    if self._saved != 1:
                        self._set(1)
                self._users += 1
        return self

    def __exit__(self, *exc):
        if self.available:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved not in (None, 1):
                    self._set(self._saved)
        return False


_blas_pin: _BlasPin | None = None


_blas_pin_lock = threading.Lock()


def get_blas_pin() -> _BlasPin:
    """The one process-wide pin (created under a lock: two pins would count users separately)."""
    global _blas_pin
    with _blas_pin_lock:
        if _blas_pin is None:
            _blas_pin = _BlasPin()
        return _blas_pin
