"""float16 and bfloat16 -> float32 inside CPU kernels, on the raw 16-bit patterns.

Numba has no float16 on the CPU and nobody has a bfloat16 type, so 16-bit caches reach the kernels
as ``uint16`` views of the same memory and are widened in registers. Both conversions are exact
and branch-free (selects, no jumps), so a loop over a tile vectorises:

* bfloat16 is the top half of a float32: the bits shifted left by 16.
* float16 (IEEE binary16): where the CPU converts half floats itself (x86 F16C's ``vcvtph2ps``,
  every AArch64 CPU), LLVM's ``fpext half to float``, which vectorises. Elsewhere in integer
  arithmetic: exponent and mantissa move into float32 position and the exponent bias is adjusted
  (112 = 127 - 15); infinities and NaNs get the rest of the exponent range; subnormals are
  renormalised by one float subtraction (the "magic number" method of F. Giesen's
  ``half_to_float_fast``). Both are checked against NumPy on all 65536 patterns in the tests.
"""

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.extending import intrinsic

from ..fastexp import _bits_as_float

__all__ = ["f16_bits_to_f32", "bf16_bits_to_f32", "widen_bits", "widen_bits_integer", "FLOAT16_BITS", "BFLOAT16_BITS"]

#: what a ``uint16`` cache holds, as the kernels' ``half_kind`` argument
FLOAT16_BITS, BFLOAT16_BITS = 1, 2

_EXP_MASK = 0x7C00 << 13  # float16's exponent field, moved into float32 position
_BIAS_ADJUST = (127 - 15) << 23  # added once for every number, twice for inf/NaN
_SUBNORMAL_MAGIC = 113 << 23  # float32 2^-14: subtracted to renormalise a subnormal


@intrinsic
def _fpext_half(typingctx, h):
    """LLVM's ``fpext half to float`` of uint16 bits: one instruction where the CPU has one."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


def _host_converts_halves() -> bool:
    """Whether LLVM lowers ``fpext half`` to an instruction here (else it would call a runtime
    helper that Numba's JIT may not link)."""
    try:
        features = binding.get_host_cpu_features()
    except Exception:  # llvmlite cannot tell: take the integer path, which always works
        return False
    triple = binding.get_process_triple()
    return triple.startswith(("aarch64", "arm64")) or bool(features.get("f16c", False))


@njit(inline="always")
def _f16_bits_to_f32_integer(h):
    """The float32 value of a float16 bit pattern, in integer arithmetic (no F16C)."""
    x = np.int64(h)
    o = (x & 0x7FFF) << 13
    e = o & _EXP_MASK
    o = o + _BIAS_ADJUST
    o = o + _BIAS_ADJUST if e == _EXP_MASK else o
    normal = _bits_as_float(np.int32(o))
    subnormal = _bits_as_float(np.int32(o + (1 << 23))) - _bits_as_float(np.int32(_SUBNORMAL_MAGIC))
    f = subnormal if e == 0 else normal
    return -f if x & 0x8000 else f


@njit(inline="always")
def _f16_bits_to_f32_native(h):
    """The float32 value of a float16 bit pattern, by the CPU's own conversion."""
    return _fpext_half(np.uint16(h))


#: the float32 value of a float16 bit pattern (an integer 0..65535), exactly
f16_bits_to_f32 = _f16_bits_to_f32_native if _host_converts_halves() else _f16_bits_to_f32_integer


@njit(inline="always")
def bf16_bits_to_f32(h):
    """The float32 value of a bfloat16 bit pattern (an integer 0..65535), exactly."""
    return _bits_as_float(np.int32(np.int64(h) << 16))


@njit
def widen_bits(bits, half_kind, out):
    """``out[i] = value of bits[i]`` over 1-D arrays (``half_kind`` FLOAT16_BITS or BFLOAT16_BITS):
    the tested entry point of both conversions."""
    if half_kind == BFLOAT16_BITS:
        for i in range(bits.shape[0]):
            out[i] = bf16_bits_to_f32(bits[i])
    else:
        for i in range(bits.shape[0]):
            out[i] = f16_bits_to_f32(bits[i])


@njit
def widen_bits_integer(bits, out):
    """``out[i]`` = value of float16 ``bits[i]`` through the integer path (tested on every host)."""
    for i in range(bits.shape[0]):
        out[i] = _f16_bits_to_f32_integer(bits[i])
