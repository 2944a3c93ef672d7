"""Finding and loading the libraries behind the ``cpu`` kernels' GEMM providers
(``engine.runtime.gemm_providers`` decides which one runs): SciPy's OpenBLAS behind ``np.dot``
(``numpy``), oneMKL's CBLAS set to its sequential layer (``mkl``), ``scipy-openblas32`` held at
one thread (``openblas``) and the engine's own register-blocked product (``fma``, compiled by
Numba: ``engine.kernels.cpu.fma_gemm``). Each loader returns a :class:`GemmProvider` or raises ``ImportError``,
``OSError`` or ``AttributeError`` with the reason it cannot load."""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass, field

__all__ = ["GemmProvider", "LOADERS"]


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
        from ..kernels.cpu.gemm import GEMM_CBLAS

        return dtype_name in ("float32", "float64") and (self.kind != GEMM_CBLAS or dtype_name in self.functions)


def _lib_dirs() -> list[str]:
    """Where pip puts shared libraries of packages like ``mkl`` and ``tbb``: ``<prefix>/lib``."""
    return list(dict.fromkeys(os.path.join(p, "lib") for p in (sys.prefix, sys.base_prefix)))


def _address(lib, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _load_numpy() -> GemmProvider:
    from ..kernels.cpu.gemm import GEMM_NUMPY

    return GemmProvider("numpy", GEMM_NUMPY, version=_scipy_openblas_version())


#: MKL_Set_Threading_Layer's code for the sequential layer (mkl_service.h)
_MKL_THREADING_SEQUENTIAL = 1


def _load_mkl() -> GemmProvider:
    from ..kernels.cpu.gemm import GEMM_CBLAS

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
    import scipy_openblas32

    from ..kernels.cpu.gemm import GEMM_CBLAS

    so = sorted(glob.glob(os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so*")))
    if not so:
        raise OSError(f"no lib{scipy_openblas32.get_library()}.so in {scipy_openblas32.get_lib_dir()}")
    lib = ctypes.CDLL(so[0])
    lib.scipy_openblas_set_num_threads(1)  # this copy serves only us; see the module docstring
    lib.scipy_openblas_get_config.restype = ctypes.c_char_p
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    version = f"{lib.scipy_openblas_get_config().decode()} ({lib.scipy_openblas_get_corename().decode()} kernels)"
    return GemmProvider(
        "openblas",
        GEMM_CBLAS,
        {"float32": _address(lib, "scipy_cblas_sgemm"), "float64": _address(lib, "scipy_cblas_dgemm")},
        version,
        (lib,),
    )


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


def _load_fma() -> GemmProvider:
    from ..kernels.cpu import fma_gemm as own
    from ..kernels.cpu.gemm import GEMM_CBLAS

    if not own.fma_ready():
        raise OSError("the CPU Numba compiles for has no FMA instructions")
    functions = {dt: own.fma_gemm(dt) for dt in ("float32", "float64")}
    version = f"the engine's own, {own.lanes('float32') * 32}-bit vectors, {own.ROWS}-row blocks"
    return GemmProvider("fma", GEMM_CBLAS, functions, version)


#: provider name -> its loader
LOADERS = {"numpy": _load_numpy, "mkl": _load_mkl, "openblas": _load_openblas, "fma": _load_fma}
