"""float32 -> 16-bit bit patterns inside ``cpu`` kernels (Numba has no float16/bfloat16 on the CPU).

* :func:`f32_to_bf16_bits`: round to nearest, ties to even, on the integer bits (the same rule as
  torch and ml_dtypes; NaN stays a quiet NaN): a few integer operations that LLVM vectorises.
* :func:`f32_to_f16_bits`: LLVM's ``fptrunc`` to ``half`` (IEEE round to nearest even, subnormals
  and overflow included), one ``vcvtps2ph`` on CPUs with F16C.
* :func:`all_finite_bits`: whether a whole array of 16-bit patterns is finite (the exponent
  field not all ones), without converting it (NumPy's sum of a bfloat16/float16 array through
  float32 took 0.3-0.6 ms at 512 Ki values here, 8-15% of a 2-thread attention call at L = 1024).
* :func:`widen` / :func:`narrow`: whole arrays, 16-bit bits <-> float32, for the ``cpu`` backend's
  wrapper (NumPy's own float16 casts ran at about 2 ns per element here, 8-12% of an L = 1024
  attention call; these vectorised loops at about 0.1).

Both are tested against ml_dtypes / NumPy on every class of input in ``tests/forward/test_cpu_16bit.py``.
"""

from llvmlite import binding, ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...runtime.jit_cache import cache_enabled

__all__ = [
    "f32_to_bf16_bits",
    "f32_to_bf16_bits_ftz",
    "f32_to_f16_bits",
    "f32_to_bf16_array",
    "f32_to_bf16_ftz_array",
    "f32_to_f16_array",
    "widen",
    "narrow",
    "all_finite_bits",
]

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
    nan = types.uint16((u >> types.uint32(16)) | types.uint32(0x40))
    rounded = types.uint16((u + types.uint32(0x7FFF) + ((u >> types.uint32(16)) & types.uint32(1))) >> types.uint32(16))
    # without a branch (a conditional return kept loops over this scalar): NaN picks ``nan``
    pick = types.uint16(x != x)
    return rounded + pick * (nan - rounded)


class _BFloatType(ir.types._BaseFloatType):
    """LLVM's ``bfloat`` (llvmlite has no class for it; its IR is text, so the name is enough)."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloatType._create_instance()


@intrinsic
def _f32_to_bf16_hw(typingctx, x):
    """LLVM's ``fptrunc float to bfloat``: one ``vcvtneps2bf16`` per 16 lanes on AVX512-BF16 CPUs."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], _BFloatType()), ir.IntType(16))

    return types.uint16(x), codegen


def _cpu_converts_bf16() -> bool:
    import numba

    features = numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()
    return "+avx512bf16" in features.split(",")


def f32_to_bf16_bits_ftz(x):
    """As :func:`f32_to_bf16_bits`, except that a subnormal float32 (below 1.2e-38 in size) may
    become a signed zero: on CPUs with AVX512-BF16 it is the CPU's own conversion
    (``vcvtneps2bf16``, which treats subnormal inputs as zero; 3x faster than the integer
    rounding), elsewhere :func:`f32_to_bf16_bits`. For values whose tiny ones do not matter: the
    softmax's probabilities, where the largest of a row is at least 1."""


@overload(f32_to_bf16_bits_ftz, inline="always")
def _f32_to_bf16_bits_ftz_impl(x):
    if x != types.float32:
        return None
    if _cpu_converts_bf16():
        return lambda x: _f32_to_bf16_hw(x)
    return lambda x: f32_to_bf16_bits(x)


@njit(cache=_CACHE)
def f32_to_bf16_ftz_array(x, out):
    """``out[i] = f32_to_bf16_bits_ftz(x[i])`` over 1-D arrays (the tested entry point)."""
    for i in range(x.shape[0]):
        out[i] = f32_to_bf16_bits_ftz(x[i])


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


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """The float32 value of a float16 bit pattern (exact: LLVM ``fpext``)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


@intrinsic
def _bits_to_f32(typingctx, u):
    """The float32 whose bits are the low 32 bits of integer ``u``."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if u.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(u), codegen


@njit(cache=_CACHE)
def widen(bits, out, is_f16):
    """``out[i]`` = the float32 value of 16-bit pattern ``bits[i]`` (float16 if ``is_f16`` else
    bfloat16), 1-D arrays; exact."""
    if is_f16:
        for i in range(bits.shape[0]):
            out[i] = _f16_bits_to_f32(bits[i])
    else:
        for i in range(bits.shape[0]):
            out[i] = _bits_to_f32(types.uint32(bits[i]) << types.uint32(16))


@njit(cache=_CACHE)
def narrow(x, bits, is_f16):
    """``bits[i]`` = float32 ``x[i]`` rounded to float16 (``is_f16``) or bfloat16, 1-D arrays."""
    if is_f16:
        for i in range(x.shape[0]):
            bits[i] = f32_to_f16_bits(x[i])
    else:
        for i in range(x.shape[0]):
            bits[i] = f32_to_bf16_bits(x[i])


@njit(cache=_CACHE)
def all_finite_bits(bits, is_f16):
    """Whether every 16-bit pattern of the 1-D uint16 array ``bits`` is a finite number: float16
    (``is_f16``) or bfloat16, whose NaNs and infinities are the patterns with an exponent field of
    all ones. Exact, and no conversion: an integer count that LLVM vectorises."""
    mask = types.uint16(0x7C00) if is_f16 else types.uint16(0x7F80)
    bad = 0
    for i in range(bits.shape[0]):
        bad += (bits[i] & mask) == mask
    return bad == 0
