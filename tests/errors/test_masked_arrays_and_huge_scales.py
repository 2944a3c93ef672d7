"""NumPy masked arrays are refused wherever the engine would otherwise read them with
``np.asarray`` (which drops the mask), and a scale that is a Python int past float64 is a
ValueError naming it, on the NumPy API and on ``engine.torch`` alike (docs/choices.md)."""

import numpy as np
import pytest

import engine


class _OwnMasked(np.ma.MaskedArray):
    """A masked array subclass defined outside NumPy (as astropy's masked columns are)."""


def _hidden(shape):
    mask = np.zeros(shape, bool)
    mask[..., shape[-1] // 2 :] = True
    return mask


@pytest.mark.parametrize("cls", [np.ma.MaskedArray, _OwnMasked])
@pytest.mark.parametrize("which", ["query", "key", "value", "attn_mask"])
def test_numpy_api_refuses_masked_arrays_and_subclasses(cls, which):
    rng = np.random.default_rng(0)
    args = {
        "query": rng.standard_normal((1, 2, 4, 8)).astype(np.float32),
        "key": rng.standard_normal((1, 2, 6, 8)).astype(np.float32),
        "value": rng.standard_normal((1, 2, 6, 8)).astype(np.float32),
        "attn_mask": np.ones((4, 6), bool),
    }
    args[which] = np.ma.masked_array(args[which], mask=_hidden(args[which].shape)).view(cls)
    for _ in range(2):  # and on the call that meets the cached plan
        with pytest.raises(TypeError, match=rf"{which} is a numpy.ma.MaskedArray"):
            engine.scaled_dot_product_attention(**args)


def test_mod_args_refuse_masked_arrays():
    q = np.ones((1, 1, 4, 8), np.float32)
    table = np.ma.masked_array(np.zeros(4, np.float32), mask=[0, 1, 0, 1])

    def bias(score, b, h, i, j, t):
        return score + t[j % 4]

    with pytest.raises(TypeError, match=r"mod_args\[0\] is a numpy.ma.MaskedArray"):
        engine.scaled_dot_product_attention(q, q, q, score_mod=bias, mod_args=(table,))


torch = pytest.importorskip("torch")
et = pytest.importorskip("engine.torch")


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 1, 4, 8, generator=gen),
        torch.randn(1, 1, 6, 8, generator=gen),
        torch.randn(1, 1, 6, 8, generator=gen),
    )


def test_engine_torch_refuses_masked_mask_sinks_and_mod_args():
    q, k, v = _tensors()
    mask = np.ma.masked_array(np.zeros((4, 6), np.float32), mask=_hidden((4, 6)))
    for _ in range(2):
        with pytest.raises(TypeError, match=r"attn_mask is a numpy.ma.MaskedArray"):
            et.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(TypeError, match=r"sinks is a numpy.ma.MaskedArray"):
        et.scaled_dot_product_attention(q, k, v, sinks=np.ma.masked_array(np.full(1, 5.0, np.float32), mask=[True]))
    table = np.ma.masked_array(np.zeros(6, np.float32), mask=[0, 1, 0, 1, 0, 1])

    def bias(score, b, h, i, j, t):
        return score + t[j]

    with pytest.raises(TypeError, match=r"mod_args\[0\] is a numpy.ma.MaskedArray"):
        et.scaled_dot_product_attention(q, k, v, score_mod=bias, mod_args=(table,))


def test_engine_torch_varlen_refuses_masked_offsets():
    q = torch.randn(6, 2, 8)
    cu = np.ma.masked_array(np.array([0, 2, 6], np.int32), mask=[0, 1, 0])
    with pytest.raises(TypeError, match=r"cu_seqlens_q is a numpy.ma.MaskedArray"):
        et.varlen_attention(q, q, q, cu, np.array([0, 2, 6], np.int32))


@pytest.mark.parametrize("scale", [10**400, -(10**400)])
def test_a_scale_past_float64_is_a_value_error_on_every_api(scale):
    q, k, v = _tensors()
    sign = "a negative" if scale < 0 else "an"
    message = rf"scale must be finite, got {sign} integer of 1329 bits"
    for _ in range(2):
        with pytest.raises(ValueError, match=message):
            engine.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(), scale=scale)
        with pytest.raises(ValueError, match=message):
            et.scaled_dot_product_attention(q, k, v, scale=scale)
    flat = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        et.varlen_attention(flat, flat, flat, cu, cu, scale=scale)
