"""Where Numba caches compiled kernels, with a private fallback.

Numba caches next to the source (``__pycache__``) or in the user's cache folder; when neither is
writable (a read-only install and an unwritable home), ``cache=True`` fails at import. This module
picks a folder that works before any kernel module is imported: ``NUMBA_CACHE_DIR`` if the user set
it, else Numba's own choice if writable, else a per-user folder in the temp directory, else no
cache at all (with a warning).

Numba's cache files are pickles, so whoever can write the cache folder can run code in every
process that loads from it. The temp-directory fallback has a predictable name, so another user of
the machine could create it first: it is used only if it is a real folder (not a symbolic link),
owned by this user, not writable by group or others, in a parent that no one else can rename it
out of (owned by this user or root, and not writable by others unless sticky, as ``/tmp``).
Otherwise caching is off, with a warning that says why. A ``NUMBA_CACHE_DIR`` that fails the same
checks is used anyway (the user chose it), with a warning. See ``docs/security.md``.

A corrupted or truncated cache file is treated as a cache miss: the kernel is recompiled and the
file rewritten, with a warning. Numba itself raises ``pickle.UnpicklingError`` there, so this module
guards its two loader methods (``IndexDataCacheFile._load_index`` and ``load``); for the whole
process, which only turns that error into a recompilation.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings

__all__ = ["cache_enabled", "cache_folder", "private_file_problem"]

_enabled: bool | None = None
#: where the engine's kernels are cached: beside them (engine/kernels/__pycache__) or Numba's
#: user-wide folder, when NUMBA_CACHE_DIR is not set
_IN_TREE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__pycache__")
_USER_WIDE = os.path.join(os.path.expanduser("~"), ".cache", "numba")


def _can_write(path: str) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return _can_write(path)


def _private_problem(path: str, is_kind, not_kind: str) -> str | None:
    """Why ``path`` may have been written by someone else (a symbolic link, not of the kind
    ``is_kind`` tests for, another owner, writable by group or others), or None; never follows a link."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not is_kind(st.st_mode):
        return not_kind
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _private_folder_problem(path: str) -> str | None:
    """Why ``path`` is not a folder that only this user can write, or None; never follows a link."""
    return _private_problem(path, stat.S_ISDIR, "is not a folder")


def _parent_problem(path: str) -> str | None:
    """Why someone else could rename ``path`` away and put their own folder there, or None."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)  # followed: /tmp itself may be a link (/private/tmp on macOS)
    except OSError as exc:
        return f"is in a folder that cannot be inspected ({parent}: {exc.strerror})"
    if st.st_uid not in (0, os.geteuid()):
        return f"is in a folder owned by uid {st.st_uid} ({parent}), who could replace it"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (
            f"is in a folder writable by group or others without the sticky bit ({parent}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}), where they could replace it"
        )
    return None


def _claim_private_folder(path: str) -> str | None:
    """Create ``path`` with mode 0700 unless it exists, then check it; None when it is safe to use.

    Checking after creating (never before) leaves no gap for someone to put their own folder there
    between the check and the use; the parent check makes sure nobody can swap it afterwards.
    """
    problem = _parent_problem(path)
    if problem:
        return problem
    try:
        os.mkdir(path, 0o700)  # the umask can only remove bits; a link in its place is not followed
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot be created ({exc.strerror})"
    return _private_folder_problem(path)


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
            warnings.warn(
                f"attention-engine: unreadable Numba cache index {self._index_path} "
                f"({type(exc).__name__}); recompiling",
                RuntimeWarning,
                stacklevel=2,
            )
            return {}

    def _load(self, key):
        try:
            return load(self, key)
        except Exception as exc:
            warnings.warn(
                f"attention-engine: unreadable Numba cache file in {self._cache_path} "
                f"({type(exc).__name__}); recompiling",
                RuntimeWarning,
                stacklevel=2,
            )
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
    why_not = "no writable folder for Numba's cache"
    if numba.config.CACHE_DIR:
        chosen = numba.config.CACHE_DIR
        _enabled = _writable(chosen)
        real = os.path.realpath(chosen)  # the user may link to a private folder: check where it goes
        problem = _enabled and (_private_folder_problem(real) or _parent_problem(real))
        if problem:
            warnings.warn(
                f"attention-engine: NUMBA_CACHE_DIR {chosen!r} {problem}; whoever can write "
                "there can run code in this process through Numba's cache files (pickles). "
                "It is used because you chose it",
                RuntimeWarning,
                stacklevel=2,
            )
    else:
        if _writable(_IN_TREE) or _writable(_USER_WIDE):
            _enabled = True
        else:
            fallback = os.path.join(tempfile.gettempdir(), f"attention-engine-numba-{os.geteuid()}")
            problem = _claim_private_folder(fallback)
            _enabled = problem is None and _can_write(fallback)
            if _enabled:
                numba.config.CACHE_DIR = fallback
            elif problem:
                why_not = (
                    f"the fallback folder for Numba's cache {fallback!r} {problem}, so it is not "
                    "used: whoever can write there could run code in this process through "
                    "Numba's cache files (pickles)"
                )
    if _enabled:
        from .compile_lock import install

        install()  # one compilation per kernel and signature among the processes sharing the cache
    if not _enabled:
        warnings.warn(
            f"attention-engine: {why_not}; kernels are compiled in every process (set "
            "NUMBA_CACHE_DIR to a private folder this user can write to fix)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _enabled


def cache_folder() -> str | None:
    """The folder for the engine's own cache files (the tuning cache), beside Numba's cache of its
    kernels and under the same rules: ``NUMBA_CACHE_DIR`` when set (the user's, or the private
    fallback chosen above), else ``engine/kernels/__pycache__`` where writable, else Numba's
    user-wide folder (``~/.cache/numba``); None when caching is off."""
    import numba

    if not cache_enabled():
        return None
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    for folder in (_IN_TREE, _USER_WIDE):
        if _writable(folder):
            return folder
    return None


def private_file_problem(path: str) -> str | None:
    """Why the file ``path`` may have been written by someone else (a symbolic link, not a regular
    file, another owner, writable by group or others), or None; never follows a link."""
    return _private_problem(path, stat.S_ISREG, "is not a regular file")
