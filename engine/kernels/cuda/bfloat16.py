"""bfloat16 <-> float32 for the ``cuda`` kernel, on the raw 16-bit patterns.

Neither NumPy nor Numba has a bfloat16 array type, so the ``cuda`` backend hands bfloat16 data
(torch ``bfloat16`` tensors, NumPy arrays of ``ml_dtypes.bfloat16``) to the kernel as ``uint16``
bit patterns and converts in registers. bfloat16 is the top half of a float32:

* ``bf16_to_float32(bits)`` is exact: the bits shifted into the top of a float32.
* ``float32_to_bf16(x)`` rounds to nearest, ties to even (what torch and ml_dtypes do): values
  past the largest bfloat16 become inf, NaN stays NaN (quiet, sign kept).

Both are plain Python here (the CUDA simulator runs them as they are, and the tests check them
against ml_dtypes on every bfloat16 pattern); in a compiled kernel the two bit casts below are
libdevice's ``__nv_int_as_float``/``__nv_float_as_int``, so the conversions are a few integer
instructions that NVVM inlines.
"""

from __future__ import annotations

import struct

from numba import float32, int32, uint16, uint32
from numba.cuda.extending import overload

__all__ = ["bf16_to_float32", "float32_to_bf16"]


def int32_as_float32(i):
    """The float32 whose bits are the low 32 bits of ``i``."""
    return float32(struct.unpack("<f", struct.pack("<I", int(i) & 0xFFFFFFFF))[0])


def float32_as_uint32(x):
    """The bits of float32 ``x`` as an unsigned 32-bit integer."""
    return uint32(struct.unpack("<I", struct.pack("<f", float(x)))[0])


@overload(int32_as_float32, target="cuda", inline="always")
def _int32_as_float32_cuda(i):
    from numba.cuda import libdevice

    return lambda i: libdevice.int_as_float(int32(i))


@overload(float32_as_uint32, target="cuda", inline="always")
def _float32_as_uint32_cuda(x):
    from numba.cuda import libdevice

    return lambda x: uint32(libdevice.float_as_int(float32(x)))


def bf16_to_float32(bits):
    """The float32 value of a bfloat16 bit pattern (exact)."""
    return int32_as_float32(uint32(bits) << uint32(16))


def float32_to_bf16(x):
    """The bfloat16 bit pattern nearest to float32 ``x`` (ties to even; NaN stays a quiet NaN)."""
    u = float32_as_uint32(x)
    if x != x:
        return uint16((u >> uint32(16)) | uint32(0x40))
    # adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
    # half is above one half, or equal to it with an odd kept half; a carry out of the mantissa
    # bumps the exponent, which is right (and turns values past the largest bfloat16 into inf)
    return uint16((u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16))
