"""Which library computes the ``cpu`` kernels' tile products, chosen per machine at run time.

The kernels call :func:`engine.kernels.cpu.gemm.tile_gemm` with a provider code and a C function
pointer; this module finds the libraries, loads them once per process, and decides which one runs:

=========  ======================================================================================
name       what it is
=========  ======================================================================================
numpy      ``np.dot`` inside the kernel: SciPy's bundled OpenBLAS. Always available (the fallback)
mkl        Intel oneMKL's CBLAS (``pip install mkl``; sequential layer), plus its bfloat16/float16
           GEMMs, which reach AMX / AVX512-BF16 / AVX512-FP16 where the CPU has them
openblas   a newer OpenBLAS (``scipy-openblas32``, a dependency), held at one thread
fma        the engine's own register-blocked product on the CPU's vector FMA, compiled by Numba
           for this CPU (``engine.kernels.cpu.fma_gemm``): no library, no packing of A, no
           clearing of C; float32 and float64
=========  ======================================================================================

MKL is loaded from ``<prefix>/lib/libmkl_rt.so*`` and set to its sequential threading layer, which
is process-wide: where MKL was already set up with another layer (a NumPy built on MKL, say), the
``mkl`` provider refuses with that reason rather than change it.

BLIS (the ``blis`` package) and a register-blocked loop in plain Numba are measured by
``bench/tile_gemm.py`` but not offered: they lost on every machine measured (the ``fma`` provider
keeps its accumulators in vector registers through LLVM's vector IR, which plain loops do not).

The choice: ``engine.set_gemm_provider(name)``, else the environment variable
``ATTENTION_ENGINE_GEMM``, else ``auto``. ``auto`` is the provider measured fastest on this machine
for the dtype and head-width class where one was measured (``engine.backends.cpu.autotune``, kept
on disk by ``engine.runtime.tuning``; the first large forward call of a dtype with heads up to 64
measures one class, the first with heads of 65 to 128 the other: the fastest library differs
between the two on some machines; wider heads take the second class's choice and measure
nothing), else the dtype's other class's measurement, else a rule per
CPU vendor (:data:`engine.runtime.config.GEMM_AUTO_ORDER`: the first installed provider of the
vendor's list; the figures behind it are in ``docs/performance.md`` and ``bench/tile_gemm.py``),
which is also what ``ATTENTION_ENGINE_AUTOTUNE=0`` leaves; ``calibrate`` times
the installed candidates at the kernel's tile shapes once per process and dtype and keeps the
fastest (about a second at first use, and timing noise on a busy machine can pick either of two
providers within a few percent of each other, so it is opt-in). A provider that is forced but
cannot load raises ``ValueError`` with the reason when it is set (or, from the environment, at
the first call). Results differ between providers only by float rounding (each is tested
against the ``reference`` backend).
"""

from __future__ import annotations

import operator
import os
import threading

from .config import (
    GEMM_AUTO_DEFAULT,
    GEMM_AUTO_ORDER,
    GEMM_CALIBRATION_BLOCKS,
    GEMM_CALIBRATION_CALLS,
    GEMM_CALIBRATION_CANDIDATES,
    GEMM_CALIBRATION_MARGIN,
    GEMM_HALF_CPU_FLAGS,
)
from .gemm_libraries import LOADERS, GemmProvider
from .machine import cpu_flags, cpu_vendor
from .tuning import lookup

__all__ = [
    "PROVIDER_KEY",
    "provider_key",
    "valid_provider_choice",
    "GemmProvider",
    "PROVIDERS",
    "ENV_VAR",
    "set_gemm_provider",
    "get_gemm_provider",
    "calibration_times",
    "load_provider",
    "cpu_flags",
    "choose_fastest",
    "auto_order",
    "sixteen_bit_gemm",
    "sixteen_bit_amx",
    "sixteen_bit_tiles",
    "OWN_TILES",
    "gemm_mode",
    "selection_token",
]

#: names of every provider, in the order ``attention-engine list`` shows them
PROVIDERS = ("mkl", "openblas", "fma", "numpy")
ENV_VAR = "ATTENTION_ENGINE_GEMM"
#: the names of the engine's own 16-bit tile products (:func:`sixteen_bit_tiles`; tuning keys)
OWN_TILES = ("amx", "avx512-bf16")
#: the tuning cache's key of the measured provider of a dtype for heads up to 64 wide
#: (``engine.runtime.tuning``); :func:`provider_key` adds the wider heads' class
PROVIDER_KEY = "cpu-gemm/{dtype}"


def width_class(width: int) -> int:
    """The width class that tuning measures heads ``width`` wide in (the larger of the query/key
    and value head sizes): 64 for heads up to 64, else 128. The one rule for the provider's key
    (:func:`provider_key`), the width it is measured at and the tiles' class
    (``engine.backends.cpu.tiles.tile_class``), so the three cannot disagree."""
    return 64 if width <= 64 else 128


def provider_key(dtype_name: str, width: int = 64) -> str:
    """The tuning key of the provider measured for ``dtype_name`` and heads ``width`` wide (the
    larger of the query/key and value head sizes): :data:`PROVIDER_KEY` in the 64 class (the key
    older versions wrote), ``PROVIDER_KEY + "/w128"`` in the 128 class (:func:`width_class`)."""
    return PROVIDER_KEY.format(dtype=dtype_name) + ("" if width_class(width) == 64 else "/w128")


_lock = threading.Lock()
_loaded: dict[str, GemmProvider | str] = {}  # name -> provider, or the reason it cannot load
_forced: str | None = None


def load_provider(name: str) -> GemmProvider | str:
    """The provider ``name`` loaded (once per process), or a string saying why it cannot load."""
    if name not in LOADERS:
        raise ValueError(f"unknown GEMM provider {name!r}; known: {', '.join(PROVIDERS)}")
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = LOADERS[name]()
            except (ImportError, OSError, AttributeError) as exc:
                _loaded[name] = f"{name}: {type(exc).__name__}: {exc}"
        return _loaded[name]


_MODES = ("auto", "calibrate")


def _check_name(name) -> str:
    if not isinstance(name, str) or (name not in _MODES and name not in LOADERS):
        raise ValueError(f"GEMM provider must be 'auto', 'calibrate' or one of {', '.join(PROVIDERS)}, got {name!r}")
    return name


def set_gemm_provider(name: str | None) -> None:
    """Choose the provider of the ``cpu`` kernels' tile products: a name from
    :data:`PROVIDERS`, ``"calibrate"`` (time the installed ones, keep the fastest), or ``None`` /
    ``"auto"`` (the provider measured on this machine per dtype and head width, else the rule
    per CPU vendor: see the module docstring). Overrides ``ATTENTION_ENGINE_GEMM``.

    :param name: a provider name, ``"calibrate"``, ``"auto"`` or None.
    :raises ValueError: for an unknown name, or a provider that cannot load here (with the reason).
    """
    global _forced
    if name is None or _check_name(name) == "auto":
        _forced = None
        return
    if name == "calibrate":
        _forced = name
        return
    got = load_provider(name)
    if isinstance(got, str):
        raise ValueError(f"GEMM provider {name!r} cannot be used on this machine: {got}")
    _forced = name


def gemm_mode() -> str:
    """How the provider is chosen now: ``auto``, ``calibrate`` or a provider's name."""
    return _requested()


#: the environment's own dict where the platform keeps one (POSIX ``os.environ._data``: bytes
#: names); reading it costs tens of nanoseconds against a microsecond for ``os.environ.get``
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_KEY = ENV_VAR.encode()


def selection_token():
    """What decides the provider choice besides the dtype: ``set_gemm_provider``'s choice and the
    raw value of ``ATTENTION_ENGINE_GEMM`` (part of every call plan's key, ``engine.plan``, so a
    change takes effect on the next call). Cheap: called on every call."""
    if _ENV_DATA is not None:
        return (_forced, _ENV_DATA.get(_ENV_KEY))
    return (_forced, os.environ.get(ENV_VAR))


def _requested() -> str:
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip() or "auto"
    try:
        return _check_name(env)
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={env!r}: {exc}") from None


def choose_fastest(seconds: dict[str, float], margin: float = GEMM_CALIBRATION_MARGIN) -> str:
    """The provider to use from measured times (seconds, lower is better): among the libraries,
    the fastest, except that ``numpy`` is kept when it is within ``margin`` of it (no extra
    library for a gain below the noise), and ``openblas`` instead of ``numpy`` there when it is
    at least as fast as ``numpy`` (a sequential copy of the same library: see
    ``GEMM_CALIBRATION_MARGIN`` in ``engine.runtime.config`` for the figures). The engine's own
    ``fma`` product is chosen only when it beats the fastest library by more than ``margin``:
    the measurement is of one medium problem, and on small tiles a library wins (AMD Zen 4, one
    thread: 32 x 32 x 64 scores products at 88 GFLOP/s against OpenBLAS's 110,
    ``bench/provider_tiles.py``).
    Ties go to the name first in ``seconds``; with no library measured, the fastest."""
    libs = {n: t for n, t in seconds.items() if n != "fma"}
    if not libs:
        return min(seconds, key=lambda n: seconds[n])
    best = min(libs, key=lambda n: libs[n])
    if "fma" in seconds and seconds["fma"] * (1.0 + margin) < libs[best]:
        return "fma"
    if "numpy" in libs and libs["numpy"] <= libs[best] * (1.0 + margin):
        if "openblas" in libs and libs["openblas"] <= libs["numpy"]:
            return "openblas"
        return "numpy"
    return best


#: dtype name -> (chosen provider name, {provider: seconds}) for ``auto``, once per process
_calibrated: dict[str, tuple[str, dict]] = {}


def _calibrate(dtype_name: str, candidates: list[GemmProvider]) -> tuple[str, dict]:
    """Time each candidate on the kernel's two tile products (thread CPU time, which time spent
    descheduled by other processes does not count; best of several blocks)."""
    import time

    import numpy as np

    from ..kernels.cpu.gemm import gemm_probe
    from .config import CPU_BIG_BLOCK_Q, CPU_BLOCK_K

    rng = np.random.default_rng(0)
    dt = np.dtype(dtype_name)
    bq, bk, e = CPU_BIG_BLOCK_Q, CPU_BLOCK_K, 64
    kt, qt = rng.standard_normal((bk, e)).astype(dt), rng.standard_normal((e, bq)).astype(dt)
    st, vt = np.empty((bk, bq), dt), rng.standard_normal((bk, e)).astype(dt)
    pv = np.empty((bq, e), dt)
    seconds = {}
    for p in candidates:
        fn = p.pointer(dtype_name)
        gemm_probe(p.kind, fn, kt, qt, st, 1)  # compiles (or loads) the probe, warms the library
        gemm_probe(p.kind, fn, st.T, vt, pv, 1)
        best = float("inf")
        for _ in range(GEMM_CALIBRATION_BLOCKS):
            t = time.thread_time()
            gemm_probe(p.kind, fn, kt, qt, st, GEMM_CALIBRATION_CALLS)
            gemm_probe(p.kind, fn, st.T, vt, pv, GEMM_CALIBRATION_CALLS)
            best = min(best, (time.thread_time() - t) / GEMM_CALIBRATION_CALLS)
        seconds[p.name] = best
    return choose_fastest(seconds), seconds


def _vendor() -> str:
    """The CPU vendor (a function of its own so tests can pretend to be another CPU)."""
    return cpu_vendor()


def auto_order(vendor: str | None = None) -> tuple:
    """The providers ``auto`` tries on this CPU vendor, first installed first."""
    return GEMM_AUTO_ORDER.get(_vendor() if vendor is None else vendor, GEMM_AUTO_DEFAULT)


def get_gemm_provider(dtype_name: str = "float32", width: int = 64) -> GemmProvider:
    """The provider the next ``cpu`` kernel call uses for operands of ``dtype_name`` in heads
    ``width`` wide.

    Forced: that one, or ``numpy`` where it lacks this dtype. ``auto``: the provider measured on
    this machine for the dtype and the width's class (:func:`provider_key`), else the one measured
    for the dtype's other class, else the first installed provider of :func:`auto_order`.
    ``calibrate``: the fastest installed candidate (timed once per process and dtype, any width).

    :param dtype_name: ``"float32"`` or ``"float64"`` (the operands' dtype); any other name gets
        ``numpy`` (no library's product of another dtype is used through this choice).
    :param width: the head size (the larger of the query/key and value ones), an int >= 1; 64
        by default.
    :raises ValueError: when ``ATTENTION_ENGINE_GEMM`` names an unknown or unloadable provider,
        or ``width`` is below 1.
    :raises TypeError: when ``width`` is not an integer.
    """
    try:
        if isinstance(width, bool):
            raise TypeError
        width = operator.index(width)
    except TypeError:
        raise TypeError(f"width must be an int (the head size), got {width!r}") from None
    if width < 1:
        raise ValueError(f"width must be at least 1 (the head size), got {width}")
    name = _requested()
    if name not in _MODES:
        got = load_provider(name)
        if isinstance(got, str):
            raise ValueError(f"{ENV_VAR}={name!r} cannot be used on this machine: {got}")
        return got if got.supports(dtype_name) else load_provider("numpy")
    if dtype_name not in ("float32", "float64"):
        return load_provider("numpy")
    if name == "auto":
        for key in dict.fromkeys(
            (provider_key(dtype_name, width), provider_key(dtype_name, 64), provider_key(dtype_name, 128))
        ):
            measured = lookup(key, valid_provider_choice)
            if measured is not None:
                return load_provider(measured["provider"])
        for candidate in auto_order():
            got = load_provider(candidate)
            if not isinstance(got, str) and got.supports(dtype_name):
                return got
        return load_provider("numpy")
    with _calibration_lock:
        if dtype_name not in _calibrated:
            candidates = [
                p
                for p in (load_provider(n) for n in GEMM_CALIBRATION_CANDIDATES)
                if not isinstance(p, str) and p.supports(dtype_name)
            ]
            if len(candidates) <= 1:
                _calibrated[dtype_name] = ("numpy", {})
            else:
                _calibrated[dtype_name] = _calibrate(dtype_name, candidates)
        return load_provider(_calibrated[dtype_name][0])


_calibration_lock = threading.Lock()


def valid_provider_choice(value: dict) -> bool:
    """Whether a stored provider choice names a provider that loads here."""
    name = value["provider"]
    return name in LOADERS and not isinstance(load_provider(name), str)


def sixteen_bit_gemm(dtype_name: str) -> GemmProvider | None:
    """The provider whose mixed-precision GEMM (16-bit operands, float32 accumulation) the ``cpu``
    kernel uses for ``dtype_name`` (``bfloat16``/``float16``), or ``None``: then the inputs are
    widened to float32 once and the float32 kernel runs.

    MKL's, when the ``mkl`` provider is forced, or under ``auto``/``calibrate`` when MKL is
    installed and the CPU has a flag of :data:`engine.runtime.config.GEMM_HALF_CPU_FLAGS` (AMX,
    AVX512-BF16, AVX512-FP16).
    """
    name = _requested()
    if name not in ("mkl", "auto", "calibrate"):
        return None
    if name != "mkl" and not set(GEMM_HALF_CPU_FLAGS.get(dtype_name, ())) & cpu_flags():
        return None
    got = load_provider("mkl")
    if isinstance(got, str) or dtype_name not in got.functions:
        return None
    return got


def sixteen_bit_amx(dtype_name: str) -> int:
    """The address of the AMX tile product (``engine.kernels.cpu.amx.amx_gemm``) the ``cpu``
    forward uses for ``dtype_name`` (``bfloat16``/``float16``) operands, or 0: under ``auto`` or
    ``calibrate`` on a CPU with AMX-BF16 / AMX-FP16 that Linux lets this process use (a provider
    named with ``set_gemm_provider`` or ``ATTENTION_ENGINE_GEMM`` is kept instead;
    ``ATTENTION_ENGINE_AMX=0`` turns it off). No library needed: the tile instructions are
    compiled by Numba."""
    if _requested() not in ("auto", "calibrate"):
        return 0
    from ..kernels.cpu.amx import amx_gemm

    return amx_gemm(dtype_name)


def sixteen_bit_tiles(dtype_name: str) -> tuple[int, str]:
    """The engine's own 16-bit tile product for ``dtype_name`` operands and its name: AMX where
    :func:`sixteen_bit_amx` gives one (``"amx"``), else for bfloat16 on a CPU with AVX512-BF16
    ``engine.kernels.cpu.avx512_bf16.bf16_dot_gemm`` (``"avx512-bf16"``: the same contract and
    operands; ``ATTENTION_ENGINE_AVX512_BF16=0`` turns it off), else ``(0, "")``. Only under
    ``auto`` or ``calibrate``, as AMX."""
    amx = sixteen_bit_amx(dtype_name)
    if amx:
        return amx, OWN_TILES[0]
    if _requested() not in ("auto", "calibrate"):
        return 0, ""
    from ..kernels.cpu.avx512_bf16 import bf16_dot_gemm

    dot = bf16_dot_gemm(dtype_name)
    return (dot, OWN_TILES[1]) if dot else (0, "")


def calibration_times() -> dict:
    """The calibration's measured microseconds per provider, by dtype (where it ran)."""
    return {dt: {n: round(t * 1e6, 1) for n, t in c[1].items()} for dt, c in _calibrated.items() if c[1]}
