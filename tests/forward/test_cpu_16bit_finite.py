"""The 16-bit forward's screen of ``v`` (``operands.all_finite16``, on the bits): a value tile with
a NaN or an infinity must leave MKL's 16-bit GEMM path for the widened one, which handles them
exactly; a finite one must not. Checked on every one of the 65536 patterns of both formats."""

import ml_dtypes
import numpy as np
import pytest

from engine.backends.cpu.operands import all_finite16

ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)], ids=str)
def test_all_finite16_on_every_pattern(dtype):
    values = ALL_BITS.view(dtype)
    finite = np.isfinite(values.astype(np.float32))
    assert 0 < finite.sum() < finite.size
    assert all_finite16(values[finite].reshape(1, 1, -1, 1))
    for x in values[~finite][:: max(1, int((~finite).sum()) // 64)]:  # NaNs and both infinities
        a = np.ones((1, 2, 8, 4), dtype)
        a[0, 1, 5, 3] = x
        assert not all_finite16(a), (dtype, x)
    for x in (np.inf, -np.inf):
        a = np.zeros((1, 2, 8, 4), dtype)
        a[0, 0, 0, 0] = x
        assert not all_finite16(a)
