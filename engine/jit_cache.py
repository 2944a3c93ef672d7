"""Where Numba caches compiled kernels, with a writable fallback.

Numba caches next to the source (``__pycache__``) or in the user's cache folder; when neither is
writable (a read-only install and an unwritable home), ``cache=True`` fails at import. This module
picks a folder that works before any kernel module is imported: ``NUMBA_CACHE_DIR`` if the user set
it, else Numba's own choice if writable, else a per-user folder in the temp directory, else no
cache at all (with a warning).

A corrupted or truncated cache file is treated as a cache miss: the kernel is recompiled and the
file rewritten, with a warning. Numba itself raises ``pickle.UnpicklingError`` there, so this module
guards its two loader methods (``IndexDataCacheFile._load_index`` and ``load``); for the whole
process, which only turns that error into a recompilation.
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


def _tolerate_corrupt_cache_files() -> None:
    from numba.core import caching

    cls = getattr(caching, "IndexDataCacheFile", None)
    if cls is None or getattr(cls, "_attention_engine_guarded", False):
        return
    load_index, load = cls._load_index, cls.load

    def _load_index(self):
        try:
            return load_index(self)
        except Exception as exc:  # unpickling garbage can raise almost anything
            warnings.warn(f"attention-engine: unreadable Numba cache index {self._index_path} "
                          f"({type(exc).__name__}); recompiling", RuntimeWarning, stacklevel=2)
            return {}

    def _load(self, key):
        try:
            return load(self, key)
        except Exception as exc:
            warnings.warn(f"attention-engine: unreadable Numba cache file in {self._cache_path} "
                          f"({type(exc).__name__}); recompiling", RuntimeWarning, stacklevel=2)
            return None

    cls._load_index, cls.load = _load_index, _load
    cls._attention_engine_guarded = True


def cache_enabled() -> bool:
    """Configure Numba's cache folder once; True when kernels may use ``cache=True``."""
    global _enabled
    if _enabled is not None:
        return _enabled
    import numba

    _tolerate_corrupt_cache_files()
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
