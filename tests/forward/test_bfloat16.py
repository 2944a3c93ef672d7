"""bfloat16 support: the kernel's bit conversions against ml_dtypes, and what other backends say.

The conversions in ``engine.kernels.cuda.bfloat16`` are the Python code the CUDA simulator runs; on a
GPU the same code compiles with libdevice bit casts (checked for PTX in ``test_cuda_ptx.py``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import engine
from engine.kernels.cuda.bfloat16 import bf16_to_float32, float32_to_bf16

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_every_bfloat16_pattern_converts_exactly_to_float32():
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(BF16).astype(np.float32)
    got = np.array([bf16_to_float32(b) for b in bits], dtype=np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    # bit-exact, so -0.0, subnormals and infinities are told apart
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _float32_cases(rng):
    """Random bit patterns over every exponent, plus the cases rounding gets wrong most easily."""
    random = rng.integers(0, 1 << 32, size=40_000, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [
            0x00000000,
            0x80000000,  # +-0
            0x7F800000,
            0xFF800000,  # +-inf
            0x7FC00000,
            0xFFC00000,
            0x7F800001,  # quiet NaNs, a signalling NaN
            0x00000001,
            0x807FFFFF,  # subnormals
            0x3F808000,
            0x3F818000,  # exact ties: to even (down, then up)
            0x3F808001,
            0x3F807FFF,  # just above / below a tie
            0x7F7FFFFF,
            0x7F7F7FFF,
            0x7F7F8000,  # past the largest bfloat16: inf; below; tie to inf
            0xFF7FFFFF,  # -> -inf
        ],
        dtype=np.uint32,
    )
    return np.concatenate([special, random]).view(np.float32)


def test_float32_rounds_to_nearest_even_bfloat16_as_ml_dtypes(rng):
    x = _float32_cases(rng)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(BF16)
    got = np.array([float32_to_bf16(v) for v in x], dtype=np.uint16).view(BF16)
    nan = np.isnan(x)
    assert np.all(np.isnan(got[nan].astype(np.float32)))
    # NaN keeps its sign and stays quiet (the top mantissa bit set)
    assert np.array_equal(got[nan].view(np.uint16) >> 15, x[nan].view(np.uint32) >> 31)
    assert np.all(got[nan].view(np.uint16) & 0x40)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def test_round_trip_keeps_every_bfloat16_value():
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = np.isfinite(bits.view(BF16).astype(np.float32))
    back = np.array([float32_to_bf16(bf16_to_float32(b)) for b in bits[finite]], dtype=np.uint16)
    assert np.array_equal(back, bits[finite])


def test_cpu_computes_bfloat16_as_the_reference_does(rng):
    """The cpu backend takes bfloat16 (widened to float32, rounded once): within one bfloat16
    step of the reference's float64-then-round result, in bfloat16 (lse too)."""
    q = rng.standard_normal((1, 2, 5, 4)).astype(BF16)
    out, lse = engine.scaled_dot_product_attention(q, q, q, backend="cpu", return_lse=True)
    ref, ref_lse = engine.scaled_dot_product_attention(q, q, q, backend="reference", return_lse=True)
    assert out.dtype == BF16 and lse.dtype == BF16
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=2**-7, atol=2**-8)
    np.testing.assert_allclose(lse.astype(np.float64), ref_lse.astype(np.float64), rtol=2**-7, atol=2**-8)
    assert "bfloat16" in engine.get_backend("cuda").dtypes


def test_reference_computes_bfloat16_from_its_exact_values(rng):
    """float64 scores from the bfloat16 values, one rounding: within one bfloat16 step (2^-8
    relative) of the float32 oracle on the same values."""
    q, k, v = (rng.standard_normal(s).astype(BF16) for s in ((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 5)))
    mask = rng.standard_normal((7, 9)).astype(BF16)
    mask[3] = -np.inf
    out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference", return_lse=True)
    assert out.dtype == BF16 and lse.dtype == BF16
    up = [a.astype(np.float32) for a in (q, k, v, mask)]
    want, want_lse = engine.scaled_dot_product_attention(*up[:3], attn_mask=up[3], backend="reference", return_lse=True)
    np.testing.assert_allclose(out.astype(np.float32), want, rtol=2.0**-8, atol=1e-6)
    np.testing.assert_allclose(lse.astype(np.float32), want_lse, rtol=2.0**-8, atol=1e-6)
    assert np.all(out[:, :, 3].astype(np.float32) == 0) and np.all(np.isneginf(lse[:, :, 3].astype(np.float32)))


def test_bfloat16_query_with_float32_key_is_a_clear_error(rng):
    q = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        engine.scaled_dot_product_attention(q.astype(BF16), q, q, backend="cuda")


def test_other_two_byte_records_are_not_taken_for_bfloat16():
    q = np.zeros((1, 2, 5, 4), dtype="V2")
    with pytest.raises(TypeError, match="query must have a floating dtype"):
        engine.scaled_dot_product_attention(q, q, q)


def test_torch_bfloat16_cpu_tensors_are_read_as_ml_dtypes_bfloat16(rng):
    torch = pytest.importorskip("torch")
    q = torch.randn(2, 3, 6, 4, dtype=torch.bfloat16)
    k = torch.randn(2, 3, 9, 4, dtype=torch.bfloat16).transpose(-1, -2).contiguous().transpose(-1, -2)
    out = engine.scaled_dot_product_attention(q, k, k, is_causal=True, backend="reference")
    host = [t.view(torch.uint16).numpy().view(BF16) for t in (q, k)]
    want = engine.scaled_dot_product_attention(host[0], host[1], host[1], is_causal=True, backend="reference")
    assert out.dtype == BF16 and np.array_equal(out.view(np.uint16), want.view(np.uint16))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), k.float(), is_causal=True)
    np.testing.assert_allclose(out.astype(np.float32), ref.numpy(), rtol=2.0**-8, atol=1e-6)


def test_variants_take_bfloat16_inputs_and_weights_cast_to_their_dtype(rng):
    """As for float16 inputs: a float32 variant casts bfloat16 (exactly) to float32."""
    torch = pytest.importorskip("torch")
    attn = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    x = rng.standard_normal((2, 5, 8)).astype(BF16)
    want, _ = attn(x.astype(np.float32))
    out, _ = attn(x)
    assert out.dtype == np.float32 and np.array_equal(out, want)
    out_t, _ = attn(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16))
    assert np.array_equal(out_t, want)
    state = {name: w.astype(BF16) for name, w in attn.state_dict().items()}
    other = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=1)
    other.load_state_dict(state)
    assert all(np.array_equal(other.state_dict()[n], state[n].astype(np.float32)) for n in state)


class _DeviceRecord:
    """A device-array stand-in: an anonymous 2-byte type that is not torch's bfloat16."""

    dtype = "void16"

    def __init__(self, shape):
        self.shape = shape
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": "<V2",
            "data": (0, False),
            "strides": None,
            "version": 3,
        }


def test_only_torch_bfloat16_device_arrays_are_read_as_bfloat16():
    q = _DeviceRecord((1, 2, 5, 4))
    with pytest.raises(TypeError, match=r"query must have a floating dtype .* got \|V2"):
        engine.scaled_dot_product_attention(q, q, q, backend="cuda")
