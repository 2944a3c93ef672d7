"""The ``cpu`` backend's Numba kernels (``njit(parallel=True)``): forward, backward, decoding, and
their tile products."""
