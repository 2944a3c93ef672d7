"""How the ``cuda`` kernels store 16- and 32-bit values (a cache's, a query's or an output's
storage kind): float32, float16, or bfloat16 as its ``uint16`` bit patterns."""

__all__ = ["CACHE_FLOAT32", "CACHE_FLOAT16", "CACHE_BFLOAT16"]

CACHE_FLOAT32, CACHE_FLOAT16, CACHE_BFLOAT16 = 0, 1, 2
