"""Where Numba caches compiled kernels, with a writable fallback.

Numba caches next to the source (``__pycache__``) or in the user's cache folder; when neither is
writable (a read-only install and an unwritable home), ``cache=True`` fails at import. This module
picks a folder that works before any kernel module is imported: ``NUMBA_CACHE_DIR`` if the user set
it, else Numba's own choice if writable, else a per-user folder in the temp directory, else no
cache at all (with a warning).
"""
from __future__ import annotations

import os
import tempfile
import warnings

__all__ = ["cache_enabled"]

_enabled: bool | None = None


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            return True
    except OSError:
        return False


def cache_enabled() -> bool:
    """Configure Numba's cache folder once; True when kernels may use ``cache=True``."""
    global _enabled
    if _enabled is not None:
        return _enabled
    import numba

    if numba.config.CACHE_DIR:
        _enabled = _writable(numba.config.CACHE_DIR)
    else:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__pycache__")
        user = os.path.join(os.path.expanduser("~"), ".cache", "numba")
        if _writable(here) or _writable(user):
            _enabled = True
        else:
            fallback = os.path.join(tempfile.gettempdir(), f"attention-engine-numba-{os.getuid()}")
            _enabled = _writable(fallback)
            if _enabled:
                numba.config.CACHE_DIR = fallback
    if not _enabled:
        warnings.warn("attention-engine: no writable folder for Numba's cache; kernels are compiled "
                      "in every process (set NUMBA_CACHE_DIR to fix)", RuntimeWarning, stacklevel=2)
    return _enabled
