"""The ``cpu`` backend: Numba ``njit(parallel=True)`` kernels, tiled online softmax, BLAS tile
products; memory linear in the sequence length. One op per capability: ``forward``, ``backward``,
``decode``, ``varlen`` (packed sequences, and the decode op's packed queries), ``varlen_backward``."""

from __future__ import annotations

from ..base import Backend
from .backward import CpuBackward
from .decode import CpuDecode
from .forward import CpuForward
from .varlen import CpuVarlen
from .varlen_backward import CpuVarlenBackward

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    name = "cpu"
    description = "Numba njit(parallel=True), tiled online softmax, BLAS tiles; memory linear in L"
    priority = 10
    ops = (CpuForward, CpuBackward, CpuDecode, CpuVarlen, CpuVarlenBackward)

    def capabilities(self) -> dict:
        from ...runtime.gemm_providers import gemm_provider_info

        caps = super().capabilities()
        info = gemm_provider_info()
        providers = info["providers"]
        caps["gemm"] = info
        caps["notes"] = [
            f"tile products ({info['requested']}): "
            + "; ".join(
                f"{dt} {name}" + ("" if " " in name else f" ({providers[name]})") for dt, name in info["in_use"].items()
            )
            + "; choose with ATTENTION_ENGINE_GEMM or engine.set_gemm_provider"
        ]
        return caps
