"""Kernels specialised on the caller's mods: the same code with the mods bound as globals.

The mods are globals of the compiled code, not arguments: Numba then calls them directly (inlined,
vectorised), and a kernel without mods loads from Numba's disk cache (a function argument would
put a function type in the signature, which never matches after unpickling). Shared by the
forward and backward kernels and the score_mod derivative.
"""

import hashlib
import os
import types

from ..runtime.jit_cache import cache_enabled

__all__ = ["named", "cache_tag", "code_digest", "CACHED_MODS_ENV"]

#: packages whose mods get disk-cached kernels (importable by every process, edited only with
#: the package): the built-in variants and the engine itself
_CACHED_MOD_PACKAGES = ("variants", "engine")

#: opt-in: comma-separated top-level modules or packages whose mods are disk-cached too, as the
#: built-ins' are (a test suite's or a project's own mods module; docs/mods.md says when it is safe)
CACHED_MODS_ENV = "ATTENTION_ENGINE_CACHED_MODS"


def _cached_mod_packages() -> tuple[str, ...]:
    """The built-in packages and those named by ``ATTENTION_ENGINE_CACHED_MODS`` (read per call,
    so a test suite may set it after ``engine`` was imported). ``__main__`` is never one: a
    script's module is another module in every process."""
    extra = (name.strip() for name in os.environ.get(CACHED_MODS_ENV, "").split(","))
    return _CACHED_MOD_PACKAGES + tuple(name for name in extra if name and name != "__main__")


def named(code, env, name, tag):
    """A function of ``code`` over the globals ``env``, whose qualified name (part of Numba's
    cache key) ends in ``tag``."""
    fn = types.FunctionType(code, env, name)
    fn.__qualname__ = f"{name}_{tag}" if tag else name
    return fn


def cache_tag(*mods):
    """A name that tells this tuple of mods apart in Numba's disk cache, or None to not cache.

    Numba finds a cached kernel by file, qualified name, code and signature; kernels with mods
    share the first and third with the plain one, so the qualified name carries this tag: a hash
    of each mod's module, name and code object (its constants and line numbers too), so an edited
    mod gets a new entry. ``None`` entries stand for "no mod". Not cached: closures (their captured
    values are compiled in but are not in the code) and mods from elsewhere (a script's module
    cannot be imported by the next process; a third-party mod may call functions whose edits the
    tag cannot see), unless their top-level package is named in ``ATTENTION_ENGINE_CACHED_MODS``.
    """
    if not cache_enabled():
        return None
    packages = _cached_mod_packages()
    h = hashlib.sha256()
    for mod in mods:
        if mod is None:
            h.update(b"-")
            continue
        fn = getattr(mod, "py_func", mod)
        module = getattr(fn, "__module__", None) or ""
        if module.split(".")[0] not in packages or not hasattr(fn, "__code__"):
            return None
        if fn.__closure__:  # captured values are compiled in, and the code does not show them
            return None
        h.update(f"{module}.{fn.__qualname__}".encode())
        code_digest(fn.__code__, h)  # the mod's code and constants: an edit is a new entry
    return h.hexdigest()[:16]


def code_digest(code, h):
    """Feed ``h`` (a :mod:`hashlib` object) what defines ``code``: its bytecode, names, line
    table, flags and constants, nested functions' code recursively; the same in every process.

    Not ``marshal.dumps``: from format 3 on it marks objects referenced more than once, so the
    bytes depend on reference counts (a code object built from a template hashed differently under
    pytest than alone, and its kernel never loaded from the cache in another process). A frozenset
    constant (``x in {"a", "b"}``) iterates in an order that depends on ``PYTHONHASHSEED``, so its
    members are hashed sorted, as marshal does."""
    for field in ("co_code", "co_linetable", "co_exceptiontable"):
        h.update(getattr(code, field, b""))
    h.update(
        repr(
            (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_argcount)
            + (code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, code.co_firstlineno)
        ).encode()
    )
    for const in code.co_consts:
        _const_digest(const, h)


def _const_digest(const, h):
    if isinstance(const, types.CodeType):
        h.update(b"<code")
        code_digest(const, h)
        h.update(b">")
    elif isinstance(const, tuple):
        h.update(b"(")
        for item in const:
            _const_digest(item, h)
        h.update(b")")
    elif isinstance(const, frozenset):
        h.update(b"{" + ",".join(sorted(repr(item) for item in const)).encode() + b"}")
    else:  # numbers, strings, bytes, None, Ellipsis: their type and repr say all
        h.update(f"{type(const).__name__}:{const!r};".encode())
