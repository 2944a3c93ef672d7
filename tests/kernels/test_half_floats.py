"""The CPU kernels' float16/bfloat16 -> float32 conversions, on every 16-bit pattern."""

import numpy as np
import pytest

from engine.kernels.cpu.half_floats import BFLOAT16_BITS, FLOAT16_BITS, widen_bits, widen_bits_integer


@pytest.mark.parametrize("kind", ["float16", "float16-integer-path", "bfloat16"])
def test_every_pattern_widens_exactly(kind):
    if kind.startswith("float16"):
        dtype, half_kind = np.float16, FLOAT16_BITS
    else:
        dtype, half_kind = pytest.importorskip("ml_dtypes").bfloat16, BFLOAT16_BITS
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    if kind == "float16-integer-path":  # the path of CPUs without a half-float conversion
        widen_bits_integer(bits, out)
    else:
        widen_bits(bits, half_kind, out)
    want = bits.view(dtype).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    # bit for bit: signed zeros, subnormals, infinities included
    np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))
