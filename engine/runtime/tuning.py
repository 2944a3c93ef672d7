"""Choices measured once per machine and kept on disk (as Triton's autotune keeps its configs).

The ``cpu`` forward kernel's tile shapes and GEMM provider decide 10-30% of its speed, and the best
ones differ between CPUs (an AMD Zen 4 wanted 64 x 128 tiles where a Zen 3 wanted 128 x 256; an
AVX-512 Xeon wants MKL's generated GEMMs). So the backend measures its candidates on this machine
the first time a problem class needs them (``engine.backends.cpu.autotune``; about a second per
class, once) and this module keeps the answers:

* in memory for the process, and
* on disk beside Numba's cache of the engine's kernels (``engine.runtime.jit_cache.cache_folder``),
  in ``attention-engine-tuning-<machine>.json``, where ``<machine>`` is a hash of what the answers
  depend on (:func:`machine_fingerprint`: CPU model and vector ISA, core count, the versions of the
  engine, NumPy, SciPy, Numba and the installed GEMM libraries, a hash of the cpu kernels' source
  in ``engine/kernels`` and ``engine/kernels/cpu``). A different CPU, library version or kernel
  code reads another file, so it measures again.

The file is read only if it is a regular file owned by this user and not writable by group or
others (the rules of the Numba cache folder, ``docs/security.md``), and every value is checked by
the caller before use, so a file written by someone else can at worst be ignored. It is written
atomically (a temporary file renamed over it), so concurrent processes never read half a file; two
that tune at once both write, and the last one wins.

Tuning is on by default. ``ATTENTION_ENGINE_AUTOTUNE=0`` (or :func:`set_autotune`) turns it off:
then the fixed rules of ``engine.backends.cpu.tiles`` and ``engine.runtime.config`` apply, and
nothing is read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable

__all__ = [
    "ENV_VAR",
    "set_autotune",
    "autotune_enabled",
    "machine_fingerprint",
    "lookup",
    "tuned",
    "remember",
    "tuning_info",
    "tuning_path",
    "state_token",
]

ENV_VAR = "ATTENTION_ENGINE_AUTOTUNE"

_forced: bool | None = None
_lock = threading.RLock()
_memory: dict[str, dict] = {}  # key -> choice, for this process
_loaded_from_disk = False
_warned: set = set()
#: bumped whenever what this process knows changes (a measurement, a stored choice, ``_forget``)
_generation = 0
#: the environment's own dict where the platform keeps one (as ``gemm_providers.selection_token``)
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEY = ENV_VAR.encode()


def set_autotune(enabled: bool | None) -> None:
    """Turn measuring-and-caching on (True) or off (False: the fixed rules), or back to the
    environment's choice (None: ``ATTENTION_ENGINE_AUTOTUNE``, on unless ``0``/``off``/``false``)."""
    global _forced
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_autotune takes True, False or None, got {enabled!r}")
    _forced = enabled


def state_token():
    """What the measured choices in use depend on besides the problem: ``set_autotune``'s choice,
    the raw ``ATTENTION_ENGINE_AUTOTUNE`` and a count of the changes to what this process knows.
    Part of every call plan's key (``engine.plan``): a plan made before a measurement, or with
    tuning on, is not reused after (its tiles and provider would differ from the backward's).
    Cheap: called on every call."""
    env = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(ENV_VAR)
    return (_forced, env, _generation)


def autotune_enabled() -> bool:
    """Whether choices are measured (and read from and written to the disk cache)."""
    if _forced is not None:
        return _forced
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "off", "false", "no")


def _cpu_fields() -> dict:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "model name", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value.strip()
                if len(fields) == 5:
                    break
    except OSError:
        import platform

        fields["model name"] = platform.processor() or platform.machine()
    flags = fields.pop("flags", "").split()
    # the ISA the kernels' code and the GEMM libraries choose by (not the whole flag list, which
    # differs between hypervisors for one CPU)
    fields["isa"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "sve", "asimd")))
    return fields


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("attention-engine", "numpy", "scipy", "numba", "llvmlite", "mkl", "scipy-openblas32"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


_KERNELS_DIGEST: list = []


#: besides the kernels, the files whose rules decide what is measured and chosen (the tuner's
#: problems and candidates, ``choose_fastest``): a changed rule measures again
_RULE_FILES = (("backends", "cpu", "autotune.py"), ("runtime", "gemm_providers.py"))


def _kernels_digest() -> str:
    """A hash of the cpu kernels' source files (``engine/kernels/*.py`` and ``engine/kernels/cpu/
    *.py``, what the cpu kernels import) and of the tuner's rules (:data:`_RULE_FILES`): a checkout
    whose kernels or rules were edited measures again (its version number does not change; choices
    measured before a kernel change, e.g. where the tiles' scratch sits in memory, may not hold
    after, and a stored provider was chosen by the rule of its day)."""
    if not _KERNELS_DIGEST:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        top = os.path.join(package, "kernels")
        h = hashlib.sha256()
        for folder in (top, os.path.join(top, "cpu")):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as f:
                        h.update(name.encode() + b"\0" + f.read())
        for parts in _RULE_FILES:
            with open(os.path.join(package, *parts), "rb") as f:
                h.update("/".join(parts).encode() + b"\0" + f.read())
        _KERNELS_DIGEST.append(h.hexdigest()[:16])
    return _KERNELS_DIGEST[0]


def machine_fingerprint() -> dict:
    """What the measured choices depend on: CPU (vendor, model, vector ISA), the target Numba
    compiles for (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES``: AVX2 code on an AVX-512 CPU measures
    other tiles), logical core count, library versions and the ``cpu`` kernels' code."""
    import numba

    return {
        "cpu": _cpu_fields(),
        "numba_target": [numba.config.CPU_NAME, numba.config.CPU_FEATURES],
        "cores": os.cpu_count(),
        "versions": _versions(),
        "kernels": _kernels_digest(),
    }


def _fingerprint_hash() -> str:
    text = json.dumps(machine_fingerprint(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tuning_path() -> str | None:
    """The disk cache's file for this machine, or None where the kernels' cache is off."""
    from .jit_cache import cache_folder

    folder = cache_folder()
    if folder is None:
        return None
    return os.path.join(folder, f"attention-engine-tuning-{_fingerprint_hash()}.json")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"attention-engine: {message}", RuntimeWarning, stacklevel=3)


def _read_disk(path: str) -> dict:
    from .jit_cache import private_file_problem

    if not os.path.lexists(path):
        return {}
    problem = private_file_problem(path)
    if problem:
        _warn_once(f"the tuning cache {path!r} {problem}; it is ignored (and not rewritten)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        _warn_once(f"the tuning cache {path!r} cannot be read ({type(exc).__name__}: {exc}); measuring again")
        return {}
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, dict):
        return {}
    return {k: v for k, v in choices.items() if isinstance(k, str) and isinstance(v, dict)}


def _write_disk(path: str, key: str, value: dict) -> None:
    from .jit_cache import private_file_problem

    if os.path.lexists(path) and private_file_problem(path):
        return  # warned when read
    choices = _read_disk(path)  # another process may have added classes since
    choices[key] = value
    data = {"machine": machine_fingerprint(), "choices": choices}
    folder = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".attention-engine-tuning-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        _warn_once(f"the tuning cache {path!r} cannot be written ({exc.strerror}); choices last for this process")


def _load_once() -> None:
    global _loaded_from_disk
    if _loaded_from_disk:
        return
    _loaded_from_disk = True
    path = tuning_path()
    if path is not None:
        for key, value in _read_disk(path).items():
            _memory.setdefault(key, value)


def lookup(key: str, valid: Callable[[dict], bool]) -> dict | None:
    """The choice stored under ``key`` (this process's, else the disk cache's) if ``valid``
    accepts it; None when there is none, or tuning is off."""
    if not autotune_enabled():
        return None
    with _lock:
        _load_once()
        value = _memory.get(key)
    if value is None:
        return None
    try:
        ok = valid(value)
    except (KeyError, TypeError, ValueError):
        ok = False
    return value if ok else None


def tuned(key: str, measure: Callable[[], dict], valid: Callable[[dict], bool]) -> dict | None:
    """The choice under ``key``: stored (see :func:`lookup`), else measured now by ``measure()``
    (once per process: concurrent callers wait for the first), stored in memory and on disk. None
    when tuning is off."""
    got = lookup(key, valid)
    if got is not None or not autotune_enabled():
        return got
    with _lock:
        got = lookup(key, valid)
        if got is not None:
            return got
        value = measure()
        _store(key, value)
        path = tuning_path()
        if path is not None:
            _write_disk(path, key, value)
        return value


def remember(key: str, value: dict) -> None:
    """Store ``value`` under ``key`` (a choice measured along with another); nothing when tuning
    is off."""
    if not autotune_enabled():
        return
    with _lock:
        _load_once()
        _store(key, value)
        path = tuning_path()
        if path is not None:
            _write_disk(path, key, value)


def _store(key: str, value: dict) -> None:
    global _generation
    _memory[key] = value
    _generation += 1


def tuning_info() -> dict:
    """What ``attention-engine list`` shows: whether tuning is on, the cache file, and every
    choice known to this process (from disk or measured)."""
    enabled = autotune_enabled()
    info = {"enabled": enabled, "path": tuning_path() if enabled else None, "choices": {}}
    if enabled:
        with _lock:
            _load_once()
            info["choices"] = dict(sorted(_memory.items()))
    return info


def _forget() -> None:
    """Drop what this process knows (tests: the next lookup reads the disk again)."""
    global _loaded_from_disk, _generation
    with _lock:
        _memory.clear()
        _loaded_from_disk = False
        _generation += 1
