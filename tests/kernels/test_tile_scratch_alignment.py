"""The ``cpu`` forward's tile scratch starts on a 64-byte cache line (``tile_ops._aligned_empty``):
MKL's GEMMs write a C matrix whose rows straddle cache lines much slower (a bfloat16 score tile
took 1.6x as long), and Numba's allocator aligns to 32 bytes only."""

import numpy as np
import pytest
from numba import njit

from engine.kernels.cpu.tile_ops import _aligned_empty


@njit
def _scratch(n):
    a = _aligned_empty(n, np.float32)
    b = _aligned_empty(n, np.uint16)
    c = _aligned_empty(n, np.float64)
    a[:] = 1.0
    b[:] = 2
    c[:] = 3.0
    return a, b, c


@pytest.mark.parametrize("n", [1, 17, 4099])
def test_aligned_scratch_starts_a_cache_line_and_holds_n_elements(n):
    for _ in range(4):  # several allocations: the allocator's own alignment varies between them
        for x, value in zip(_scratch(n), (1.0, 2, 3.0)):
            assert x.ctypes.data % 64 == 0
            assert x.shape == (n,) and np.all(x == value)
