"""Variants built in float16 and bfloat16, as ``nn.MultiheadAttention(dtype=torch.float16)``:
parameters, ``state_dict`` and outputs in that dtype, computed as torch computes (projections
accumulated in float32 and rounded once to the layer dtype, attention rounded once, the output
projection likewise). Before, ``Variant.__init__`` refused every dtype but float32 and float64.

Accuracy: against torch's module in float64 holding the same (16-bit) parameters and inputs, the
engine's error is at most twice torch's own 16-bit error plus two units of roundoff of the
result's size (the bound the backward tests use for float32)."""

import numpy as np
import pytest

import engine

from conftest import variant_names

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = {"float16": (torch.float16, np.dtype(np.float16), 2.0**-11), "bfloat16": (torch.bfloat16, None, 2.0**-8)}
E, H = 32, 4


def _np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _f64(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _within_twice_torchs_error(got, torch_out, exact, unit, what):
    torch_err = float(np.max(np.abs(_f64(torch_out) - exact), initial=0.0))
    err = float(np.max(np.abs(_f64(got) - exact), initial=0.0))
    allowed = 2 * torch_err + 2 * unit * float(np.max(np.abs(exact), initial=0.0))
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g} (torch's own {torch_err:.3g})"


OPTIONS = {
    "plain": {},
    "kdim/vdim": {"kdim": 24, "vdim": 20},
    "add_bias_kv": {"add_bias_kv": True},
    "add_zero_attn": {"add_zero_attn": True},
}


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_multi_head_as_torchs_module_in_that_dtype(dtype, options, need_weights):
    tdt, _, unit = DTYPES[dtype]
    kw = OPTIONS[options]
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=tdt, **kw).eval()
    exact_m = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **kw).eval()
    exact_m.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, E, generator=gen).to(tdt)
    key = torch.randn(2, 7, kw.get("kdim", E), generator=gen).to(tdt)
    value = torch.randn(2, 7, kw.get("vdim", E), generator=gen).to(tdt)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    call = dict(key_padding_mask=pad, need_weights=need_weights)
    with torch.no_grad():
        want, want_w = m(x, key, value, **call)
        exact, exact_w = exact_m(x.double(), key.double(), value.double(), **call)

    variant = engine.get_variant("multi-head", embed_dim=E, num_heads=H, dtype=tdt, **kw)  # a torch dtype, as torch
    variant.load_state_dict(m.state_dict())
    assert variant.dtype == _np_dtype(dtype)
    got, got_w = variant(x, key, value, **call)
    assert got.dtype == _np_dtype(dtype) and got.shape == tuple(want.shape)
    _within_twice_torchs_error(got, want, _f64(exact), unit, "output")
    if need_weights:
        assert got_w.dtype == _np_dtype(dtype)
        _within_twice_torchs_error(got_w, want_w, _f64(exact_w), unit, "weights")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_state_dict_round_trips_with_torch_in_that_dtype(dtype):
    tdt = DTYPES[dtype][0]
    m = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=tdt)
    variant = engine.get_variant("multi-head", embed_dim=E, num_heads=H, dtype=dtype, seed=0)
    assert all(p.dtype == _np_dtype(dtype) for p in variant.state_dict().values())  # initialised in it
    variant.load_state_dict(m.state_dict())
    state = variant.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {k: _np_dtype(dtype) for k in m.state_dict()}
    back = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=tdt)
    back.load_state_dict({k: torch.from_numpy(v.astype(np.float32)).to(tdt) for k, v in state.items()})
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # bit for bit


def _params(name):
    from engine.plugins.registry import variant_info

    return variant_info()[0][name].cls.example_params(E, H)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", variant_names())
def test_every_variant_in_16_bits(name, dtype, backend):
    """Every registered variant builds and runs in float16/bfloat16 (its mods' arguments in a
    dtype Numba takes), and agrees with itself in float64 on the same rounded parameters and
    inputs to 16-bit accuracy."""
    unit = DTYPES[dtype][2]
    half = engine.get_variant(name, **_params(name), dtype=dtype, seed=0)
    exact = engine.get_variant(name, **_params(name), dtype=np.float64, seed=0)
    exact.load_state_dict(half.state_dict())  # the 16-bit values, widened exactly
    inputs = half.example_inputs(2, 9, key_length=11, rng=5)
    out, w = half(**inputs, need_weights=True, backend=backend)
    wide = {k: (v.astype(np.float64) if getattr(v, "dtype", None) == half.dtype else v) for k, v in inputs.items()}
    ref, ref_w = exact(**wide, need_weights=True, backend="reference")
    assert out.dtype == half.dtype and w.dtype == half.dtype
    scale = max(1.0, float(np.max(np.abs(ref))))
    # a handful of 16-bit roundings between input and output (projections, attention, output)
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=0, atol=16 * unit * scale)
    np.testing.assert_allclose(w.astype(np.float64), ref_w, rtol=0, atol=16 * unit)


@pytest.mark.parametrize("bad", [np.int32, "float128", "complex64"])
def test_other_dtypes_are_refused(bad):
    with pytest.raises(TypeError, match=r"dtype must be float16, bfloat16, float32 or float64"):
        engine.get_variant("multi-head", embed_dim=E, num_heads=H, dtype=bad)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_as_module_trains_a_16_bit_variant(dtype):
    """engine.torch.as_module keeps the variant's dtype: parameters, output and gradients in it
    (a bfloat16 variant's ml_dtypes parameters become torch bfloat16 ones)."""
    import engine.torch as et

    tdt, _, unit = DTYPES[dtype]
    variant = engine.get_variant("multi-head", embed_dim=E, num_heads=H, dtype=dtype, seed=0)
    module = et.as_module(variant)
    assert all(p.dtype == tdt for p in module.parameters())
    x = torch.randn(2, 6, E, generator=torch.Generator().manual_seed(4)).to(tdt).requires_grad_(True)
    out, _ = module(x)
    out.float().square().sum().backward()
    assert out.dtype == tdt and x.grad.dtype == tdt
    assert all(p.grad is not None and p.grad.dtype == tdt and torch.isfinite(p.grad).all() for p in module.parameters())
    expected, _ = variant(x.detach())  # the variant itself, on the host
    np.testing.assert_allclose(
        _f64(out), np.asarray(expected, np.float64), rtol=0, atol=16 * unit * max(1.0, float(np.abs(_f64(out)).max()))
    )


def test_a_bfloat16_layer_takes_bfloat16_masks():
    """ml_dtypes' bfloat16 masks (what a bfloat16 model has, as torch's bf16 MultiheadAttention
    wants masks in the query's dtype): the same bits as the same masks given in float32 (was a
    TypeError from NumPy's isdtype, which does not know bfloat16)."""
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    layer = engine.get_variant("multi-head", embed_dim=16, num_heads=2, dtype="bfloat16")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 16)).astype(bf)
    mask = rng.standard_normal((5, 5)).astype(bf)
    padding = np.zeros((2, 5), bf)
    padding[0, 4] = -np.inf
    got, _ = layer(x, x, x, attn_mask=mask, key_padding_mask=padding)
    want, _ = layer(x, x, x, attn_mask=mask.astype(np.float32), key_padding_mask=padding.astype(np.float32))
    assert got.dtype == bf
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
