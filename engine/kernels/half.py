"""float32 -> 16-bit bit patterns inside ``cpu`` kernels (Numba has no float16/bfloat16 on the CPU).

* :func:`f32_to_bf16_bits`: round to nearest, ties to even, on the integer bits (the same rule as
  torch and ml_dtypes; NaN stays a quiet NaN): a few integer operations that LLVM vectorises.
* :func:`f32_to_f16_bits`: LLVM's ``fptrunc`` to ``half`` (IEEE round to nearest even, subnormals
  and overflow included), one ``vcvtps2ph`` on CPUs with F16C.

Both are tested against ml_dtypes / NumPy on every class of input in ``tests/test_cpu_16bit.py``.
"""
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..jit_cache import cache_enabled

__all__ = ["f32_to_bf16_bits", "f32_to_f16_bits", "f32_to_bf16_array", "f32_to_f16_array"]

_CACHE = cache_enabled()


@intrinsic
def _float32_bits(typingctx, x):
    """The bits of a float32 as a uint32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@intrinsic
def f32_to_f16_bits(typingctx, x):
    """The float16 nearest to float32 ``x``, as its uint16 bit pattern."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen


@njit(cache=_CACHE, inline="always")
def f32_to_bf16_bits(x):
    """The bfloat16 nearest to float32 ``x`` (ties to even; NaN a quiet NaN), as uint16 bits."""
    u = _float32_bits(x)
    if x != x:
        return types.uint16((u >> types.uint32(16)) | types.uint32(0x40))
    return types.uint16((u + types.uint32(0x7FFF) + ((u >> types.uint32(16)) & types.uint32(1))) >> types.uint32(16))


@njit(cache=_CACHE)
def f32_to_bf16_array(x, out):
    """``out[i] = f32_to_bf16_bits(x[i])`` over 1-D arrays (the tested entry point)."""
    for i in range(x.shape[0]):
        out[i] = f32_to_bf16_bits(x[i])


@njit(cache=_CACHE)
def f32_to_f16_array(x, out):
    """``out[i] = f32_to_f16_bits(x[i])`` over 1-D arrays (the tested entry point)."""
    for i in range(x.shape[0]):
        out[i] = f32_to_f16_bits(x[i])
