"""Numba kernels: ``_``-prefixed pure functions over preallocated arrays. Importing this package
compiles nothing; the wrappers in ``engine.backends`` validate, allocate and call them."""
