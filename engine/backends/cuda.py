"""The ``cuda`` backend (numba-cuda). Importing this module never needs CUDA or a GPU."""
from __future__ import annotations

from .base import Backend

__all__ = ["CudaBackend"]


class CudaBackend(Backend):
    name = "cuda"
    description = "numba-cuda tiled flash kernel (not implemented yet)"
    dtypes = ("float32",)
    host_arrays = True
    device_arrays = True
    priority = 20

    def unavailable_reason(self):
        return "the cuda backend is not implemented yet"
