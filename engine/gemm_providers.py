"""Which library computes the ``cpu`` kernels' tile products, chosen per machine at run time.

The kernels call :func:`engine.kernels.gemm.tile_gemm` with a provider code and a C function
pointer; this module finds the libraries, loads them once per process, and decides which one runs:

=========  ======================================================================================
name       what it is
=========  ======================================================================================
numpy      ``np.dot`` inside the kernel: SciPy's bundled OpenBLAS. Always available (the fallback)
mkl        Intel oneMKL's CBLAS (``pip install mkl``; sequential layer), plus its bfloat16/float16
           GEMMs, which reach AMX / AVX512-BF16 / AVX512-FP16 where the CPU has them
openblas   a newer OpenBLAS (``pip install scipy-openblas32``), held at one thread
blis       BLIS's typed API from the ``blis`` package (BLIS 0.7: no Zen 3+ kernels, see docs)
loops      plain Numba loops, no library (slowest; there to show what BLAS buys)
=========  ======================================================================================

The choice: ``engine.set_gemm_provider(name)``, else the environment variable
``ATTENTION_ENGINE_GEMM`` (a name, or ``auto``), else ``auto``: the first available provider in
:data:`engine.config.GEMM_AUTO_ORDER` (the per-machine figures behind that order are in
``docs/performance.md`` and ``bench/tile_gemm.py``). A provider that is forced but cannot load
raises ``ValueError`` with the reason when it is set (or, from the environment, at the first call).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
from dataclasses import dataclass, field

from .config import GEMM_AUTO_ORDER

__all__ = ["GemmProvider", "PROVIDERS", "ENV_VAR", "set_gemm_provider", "get_gemm_provider",
           "available_gemm_providers", "gemm_provider_info", "load_provider", "cpu_flags"]

#: names of every provider, in the order ``attention-engine list`` shows them
PROVIDERS = ("mkl", "openblas", "numpy", "blis", "loops")
ENV_VAR = "ATTENTION_ENGINE_GEMM"


@dataclass
class GemmProvider:
    """A loaded provider: its kernel code, C function addresses per operand dtype name
    (``float32``, ``float64``, and for mixed-precision GEMMs ``bfloat16``/``float16``), and what
    it is (library and version) for listings."""

    name: str
    kind: int
    functions: dict = field(default_factory=dict)
    version: str = ""
    #: keeps the loaded libraries alive for as long as their addresses are used
    libraries: tuple = ()

    def pointer(self, dtype_name: str) -> int:
        """The address for operands of ``dtype_name`` (0 where the kind takes none)."""
        return self.functions.get(dtype_name, 0)

    def supports(self, dtype_name: str) -> bool:
        from .kernels.gemm import GEMM_BLIS, GEMM_CBLAS

        return dtype_name in self.functions if self.kind in (GEMM_CBLAS, GEMM_BLIS) else \
            dtype_name in ("float32", "float64")


_lock = threading.Lock()
_loaded: dict[str, GemmProvider | str] = {}  # name -> provider, or the reason it cannot load
_forced: str | None = None


def cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _lib_dirs() -> list[str]:
    """Where pip puts shared libraries of packages like ``mkl`` and ``tbb``: ``<prefix>/lib``."""
    return list(dict.fromkeys(os.path.join(p, "lib") for p in (sys.prefix, sys.base_prefix)))


def _address(lib, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _load_numpy() -> GemmProvider:
    from .kernels.gemm import GEMM_NUMPY

    return GemmProvider("numpy", GEMM_NUMPY, version=_scipy_openblas_version())


def _load_loops() -> GemmProvider:
    from .kernels.gemm import GEMM_LOOPS

    return GemmProvider("loops", GEMM_LOOPS, version="Numba loops")


#: MKL_Set_Threading_Layer's code for the sequential layer (mkl_service.h)
_MKL_THREADING_SEQUENTIAL = 1


def _load_mkl() -> GemmProvider:
    from .kernels.gemm import GEMM_CBLAS

    paths = [p for d in _lib_dirs() for p in sorted(glob.glob(os.path.join(d, "libmkl_rt.so*")))]
    if not paths:
        raise OSError("libmkl_rt not found in " + ", ".join(_lib_dirs()) + " (pip install mkl)")
    lib = ctypes.CDLL(paths[0])
    # sequential: each parallel task's GEMM on its own core; MKL starting threads inside our
    # threads would oversubscribe them. Returns the layer in force (another user may have fixed it)
    lib.MKL_Set_Threading_Layer.restype = ctypes.c_int
    layer = lib.MKL_Set_Threading_Layer(ctypes.c_int(_MKL_THREADING_SEQUENTIAL))
    if layer != _MKL_THREADING_SEQUENTIAL:
        raise OSError(f"MKL is already set up with threading layer {layer}, not sequential")
    buf = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buf, 256)
    functions = {"float32": _address(lib, "cblas_sgemm"), "float64": _address(lib, "cblas_dgemm")}
    for dt, sym in (("bfloat16", "cblas_gemm_bf16bf16f32"), ("float16", "cblas_gemm_f16f16f32")):
        if hasattr(lib, sym):
            functions[dt] = _address(lib, sym)
    return GemmProvider("mkl", GEMM_CBLAS, functions, buf.value.decode(errors="replace").strip(), (lib,))


def _load_openblas() -> GemmProvider:
    from .kernels.gemm import GEMM_CBLAS

    import scipy_openblas32

    so = sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so*")))
    if not so:
        raise OSError(f"no lib{scipy_openblas32.get_library()}.so in {scipy_openblas32.get_lib_dir()}")
    lib = ctypes.CDLL(so[0])
    lib.scipy_openblas_set_num_threads(1)  # this copy serves only us; see the module docstring
    lib.scipy_openblas_get_config.restype = ctypes.c_char_p
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    version = f"{lib.scipy_openblas_get_config().decode()} ({lib.scipy_openblas_get_corename().decode()} kernels)"
    return GemmProvider("openblas", GEMM_CBLAS, {"float32": _address(lib, "scipy_cblas_sgemm"),
                                                 "float64": _address(lib, "scipy_cblas_dgemm")},
                        version, (lib,))


def _load_blis() -> GemmProvider:
    from .kernels.gemm import GEMM_BLIS

    import blis
    import blis.about

    so = sorted(glob.glob(os.path.join(os.path.dirname(blis.__file__), "cy.*")))
    if not so:
        raise OSError("the blis package has no compiled extension")
    lib = ctypes.CDLL(so[0])
    lib.bli_arch_query_id.restype = ctypes.c_int
    lib.bli_arch_string.restype = ctypes.c_char_p
    arch = lib.bli_arch_string(lib.bli_arch_query_id()).decode()
    return GemmProvider("blis", GEMM_BLIS, {"float32": _address(lib, "bli_sgemm"),
                                            "float64": _address(lib, "bli_dgemm")},
                        f"BLIS (blis {blis.about.__version__}), '{arch}' kernels", (lib,))


_LOADERS = {"numpy": _load_numpy, "mkl": _load_mkl, "openblas": _load_openblas, "blis": _load_blis,
            "loops": _load_loops}


def load_provider(name: str) -> GemmProvider | str:
    """The provider ``name`` loaded (once per process), or a string saying why it cannot load."""
    if name not in _LOADERS:
        raise ValueError(f"unknown GEMM provider {name!r}; known: {', '.join(PROVIDERS)}")
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _LOADERS[name]()
            except (ImportError, OSError, AttributeError) as exc:
                _loaded[name] = f"{name}: {type(exc).__name__}: {exc}"
        return _loaded[name]


def _scipy_openblas_version() -> str:
    try:
        import scipy.linalg.cython_blas as cython_blas

        lib = ctypes.CDLL(cython_blas.__file__)
        for prefix in ("scipy_", ""):
            if hasattr(lib, prefix + "openblas_get_config"):
                get = getattr(lib, prefix + "openblas_get_config")
                get.restype = ctypes.c_char_p
                core = getattr(lib, prefix + "openblas_get_corename")
                core.restype = ctypes.c_char_p
                return f"SciPy's {get().decode()} ({core().decode()} kernels)"
    except (ImportError, OSError, AttributeError):
        pass
    return "SciPy's BLAS"


def _check_name(name) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in _LOADERS):
        raise ValueError(f"GEMM provider must be 'auto' or one of {', '.join(PROVIDERS)}, got {name!r}")
    return name


def set_gemm_provider(name: str | None) -> None:
    """Force the provider of the ``cpu`` kernels' tile products (``None`` or ``"auto"``: choose
    automatically; the environment variable ``ATTENTION_ENGINE_GEMM`` sets the same at start-up).

    :raises ValueError: for an unknown name, or a provider that cannot load here (with the reason).
    """
    global _forced
    if name is None or _check_name(name) == "auto":
        _forced = None
        return
    got = load_provider(name)
    if isinstance(got, str):
        raise ValueError(f"GEMM provider {name!r} cannot be used on this machine: {got}")
    _forced = name


def _requested() -> str:
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip() or "auto"
    try:
        return _check_name(env)
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={env!r}: {exc}") from None


def get_gemm_provider(dtype_name: str = "float32") -> GemmProvider:
    """The provider the next ``cpu`` kernel call uses for operands of ``dtype_name``.

    A forced provider that lacks this dtype (BLIS has no bfloat16 GEMM) gives ``numpy``.
    :raises ValueError: when ``ATTENTION_ENGINE_GEMM`` names an unknown or unloadable provider.
    """
    name = _requested()
    if name != "auto":
        got = load_provider(name)
        if isinstance(got, str):
            raise ValueError(f"{ENV_VAR}={name!r} cannot be used on this machine: {got}")
        return got if got.supports(dtype_name) else load_provider("numpy")
    for candidate in GEMM_AUTO_ORDER:
        got = load_provider(candidate)
        if not isinstance(got, str) and got.supports(dtype_name):
            return got
    return load_provider("numpy")


def available_gemm_providers() -> dict[str, str]:
    """Every provider: its version string when it loads here, else why it does not."""
    out = {}
    for name in PROVIDERS:
        got = load_provider(name)
        out[name] = got if isinstance(got, str) else got.version
    return out


def gemm_provider_info() -> dict:
    """What ``attention-engine list`` shows: the provider in use per dtype, how it was chosen, and
    every provider's status."""
    requested = _requested()
    return {"requested": requested, "auto_order": list(GEMM_AUTO_ORDER),
            "in_use": {dt: get_gemm_provider(dt).name for dt in ("float32", "float64")},
            "providers": {n: (v if n in v.split(":")[0] else v) for n, v in available_gemm_providers().items()}}
