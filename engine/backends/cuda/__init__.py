"""The ``cuda`` backend (numba-cuda). Importing this module never needs CUDA, a GPU or numba-cuda.

Arrays:

* NumPy (host) inputs are made C-contiguous, copied to the device on a fresh stream, and the
  result is copied back: the caller gets NumPy arrays, as from the ``cpu`` backend.
* bfloat16 (ml_dtypes' NumPy dtype, torch ``bfloat16`` tensors) reaches the kernel as ``uint16``
  views of the same memory; the kernel converts (``engine.kernels.cuda.bfloat16``).
* Device inputs (anything with ``__cuda_array_interface__``) are read **in place**, whatever their
  strides (a transposed torch tensor, a broadcast mask): the kernel indexes a flat view of the
  caller's memory through element strides (see ``engine.kernels.cuda.flash_fwd``). The result is
  allocated by the caller's library and stays on the device: torch CUDA tensors give torch
  tensors, CuPy arrays give CuPy arrays, Numba device arrays (and any other producer of the
  interface) give Numba device arrays.
* Stream: torch inputs run on ``torch.cuda.current_stream()``, CuPy inputs on CuPy's current
  stream, Numba device arrays on the stream they are bound to (``arr.stream``, else the default
  stream). The call does not synchronise for device inputs, so the result is ordered after
  earlier work on that stream and before later work, exactly as the library's own operations.
"""

from __future__ import annotations

import importlib.util
import threading

from ..base import Backend
from .backward import CudaBackward
from .decode import CudaDecode
from .forward import CudaForward

__all__ = ["CudaBackend"]


class CudaBackend(Backend):
    """The tiled flash kernels on an NVIDIA GPU; see the module docstring for array handling.

    ``block_q``/``block_k`` override the tile sizes of ``forward.tile_sizes`` and
    ``backward.backward_tile_sizes`` (tests use small ones).
    """

    name = "cuda"
    description = "numba-cuda tiled flash kernel (one block per query tile, K/V tiles in shared memory)"
    # below ``cpu``: for host arrays ``auto`` keeps to the CPU (no transfers, no GPU timings yet);
    # device arrays, which ``cpu`` refuses, go to ``cuda``
    priority = 5
    ops = (CudaForward, CudaBackward, CudaDecode)

    def __init__(self, block_q: int | None = None, block_k: int | None = None):
        super().__init__()
        self.block_q = block_q
        self.block_k = block_k
        self._why: tuple | None = None
        self._lock = threading.Lock()

    def unavailable_reason(self):
        with self._lock:
            if self._why is None:
                self._why = (self._probe(),)
            return self._why[0]

    @staticmethod
    def _probe() -> str | None:
        if importlib.util.find_spec("numba_cuda") is None:
            return "numba-cuda not installed (pip install 'attention-engine[cuda]')"
        try:
            from numba import cuda

            ok = cuda.is_available()
        except Exception as exc:  # a broken driver or toolkit install: say what it was
            return f"no CUDA GPU ({type(exc).__name__}: {exc})"
        return None if ok else "no CUDA GPU"
