"""The ``cuda`` backend's numba-cuda kernels: forward, backward, decoding. Importing this package
needs neither a GPU nor numba-cuda; each module imports ``numba.cuda`` itself."""
