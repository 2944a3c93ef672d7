"""The rest of ``torch.nn.MultiheadAttention``: ``add_bias_kv``, ``add_zero_attn`` and
``batch_first=False``, against torch with the same weights (float32 atol 1e-5, float64 1e-10), on
every backend, with every mask kind and with and without the attention weights."""

import itertools

import numpy as np
import pytest
import torch

import engine

from conftest import available_backends

TOL = {np.float32: 1e-5, np.float64: 1e-10}
BACKENDS = available_backends()


def _t(x):
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x))


def _pair(dtype, seed=0, **options):
    """An engine variant and a torch MHA with the same random weights (biases included)."""
    torch.manual_seed(seed)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    mha = torch.nn.MultiheadAttention(16, 4, dtype=tdt, **options)
    with torch.no_grad():
        for p in mha.parameters():
            p.uniform_(-0.5, 0.5)
    variant = engine.get_variant("multi-head", embed_dim=16, num_heads=4, dtype=dtype, seed=1, **options)
    variant.load_state_dict(mha.state_dict())
    return variant, mha.eval()


def _masks(rng, kind, N, L, S, dtype):
    """Engine keywords and torch keywords for one mask kind (MHA polarity: True = not allowed)."""
    kw = {}
    if kind in ("kpm", "kpm+bool"):
        kpm = rng.random((N, S)) < 0.3
        kpm[0] = True  # every key of the first sequence padded: only appended keys remain
        kw["key_padding_mask"] = kpm
    if kind in ("bool", "kpm+bool"):
        am = rng.random((L, S)) < 0.3
        am[1] = True
        kw["attn_mask"] = am
    if kind == "float":
        kw["attn_mask"] = rng.standard_normal((N * 4, L, S)).astype(dtype)
    tkw = {k: _t(v) for k, v in kw.items()}
    if kind == "causal":  # torch's explicit causal mask: its is_causal hint alone drops the mask
        kw["is_causal"] = True
        tkw["attn_mask"] = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
    return kw, tkw


def _compare(out, weights, t_out, t_w, dtype, need_weights, bias):
    t_out = t_out.detach().numpy()
    # torch's MHA gives NaN for a row that sees no key; the engine gives zero attention there,
    # so out_proj.bias comes out (the README's semantics table says so)
    dead = np.isnan(t_out)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out[dead], np.broadcast_to(bias, out.shape)[dead], atol=TOL[dtype], rtol=0)
    np.testing.assert_allclose(out[~dead], t_out[~dead], atol=TOL[dtype], rtol=0)
    if need_weights:
        t_w = t_w.detach().numpy()
        assert weights.shape == t_w.shape
        live = ~np.isnan(t_w)
        np.testing.assert_allclose(weights[live], t_w[live], atol=TOL[dtype], rtol=0)
    else:
        assert weights is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("mask", ["none", "kpm", "bool", "float", "kpm+bool", "causal"])
def test_appended_keys_match_torch(backend, dtype, add_bias_kv, add_zero_attn, mask):
    rng = np.random.default_rng(5)
    variant, mha = _pair(dtype, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, batch_first=True)
    assert {k: tuple(v.shape) for k, v in variant.state_dict().items()} == {
        k: tuple(v.shape) for k, v in mha.state_dict().items()
    }
    N, L, S = 3, 7, 9
    q = rng.standard_normal((N, L, 16)).astype(dtype)
    kv = rng.standard_normal((N, S, 16)).astype(dtype)
    kw, tkw = _masks(rng, mask, N, L, S, dtype)
    for need_weights, average in ((False, True), (True, True), (True, False)):
        out, w = variant(q, kv, kv, need_weights=need_weights, average_attn_weights=average, backend=backend, **kw)
        t_out, t_w = mha(_t(q), _t(kv), _t(kv), need_weights=need_weights, average_attn_weights=average, **tkw)
        _compare(out, w, t_out, t_w, dtype, need_weights, variant.param("out_proj.bias"))
    X = int(add_bias_kv) + int(add_zero_attn)
    assert w.shape == (N, 4, L, S + X)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_batch_first_false_takes_and_returns_sequence_first(backend, dtype, options):
    rng = np.random.default_rng(6)
    variant, mha = _pair(dtype, batch_first=False, **options)
    L, S, N = 5, 8, 3
    q = rng.standard_normal((L, N, 16)).astype(dtype)  # (L, N, E): torch's default layout
    kv = rng.standard_normal((S, N, 16)).astype(dtype)
    kpm = rng.random((N, S)) < 0.3  # masks keep their (N, S) shape
    out, w = variant(q, kv, kv, key_padding_mask=kpm, need_weights=True, backend=backend)
    t_out, t_w = mha(_t(q), _t(kv), _t(kv), key_padding_mask=_t(kpm))
    assert out.shape == (L, N, 16) and w.shape == (N, L, S + 2 * bool(options))
    _compare(out, w, t_out, t_w, dtype, True, variant.param("out_proj.bias"))
    # unbatched inputs ignore batch_first, as in torch
    out1, _ = variant(q[:, 0], kv[:, 0], kv[:, 0], backend=backend)
    t_out1, _ = mha(_t(q[:, 0]), _t(kv[:, 0]), _t(kv[:, 0]))
    np.testing.assert_allclose(out1, t_out1.detach().numpy(), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("name", ["grouped-query", "alibi", "softcap", "sliding-window", "cross", "masked"])
def test_appended_keys_on_other_variants_match_reference_and_stay_visible(name):
    """Variants built on mods or GQA: appended keys are seen by every query (mods describe the
    sequence's own keys), and the cpu kernel agrees with the reference."""
    from engine.plugins.registry import variant_info

    cls = variant_info()[0][name].cls
    params = cls.example_params(16, 4)
    variant = engine.get_variant(name, **params, add_bias_kv=True, add_zero_attn=True, seed=2)
    inputs = variant.example_inputs(2, 6, key_length=7, rng=3)
    out, w = variant(**inputs, need_weights=True, average_attn_weights=False, backend="cpu")
    ref, ref_w = variant(**inputs, need_weights=True, average_attn_weights=False, backend="reference")
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(w, ref_w, atol=1e-5, rtol=0)
    assert (w[..., -2:] > 0).all()  # bias_k and the zero key: visible from every row
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def test_bias_kv_initialised_as_torch_and_round_trips():
    v = engine.get_variant("multi-head", embed_dim=64, num_heads=4, add_bias_kv=True, seed=0)
    bk = v.state_dict()["bias_k"]
    assert bk.shape == (1, 1, 64) and 0.05 < bk.std() < 0.25  # xavier_normal_: std sqrt(1/64)
    g = engine.get_variant("grouped-query", embed_dim=64, num_heads=4, num_kv_heads=2, add_bias_kv=True)
    assert g.state_dict()["bias_k"].shape == (1, 1, 32)  # one per key/value head's width
    mha = torch.nn.MultiheadAttention(64, 4, add_bias_kv=True)
    mha.load_state_dict({k: torch.from_numpy(a) for k, a in v.state_dict().items()})
    for key, a in mha.state_dict().items():
        np.testing.assert_array_equal(a.numpy(), v.state_dict()[key])


def test_batch_first_must_be_a_bool():
    with pytest.raises(TypeError, match="batch_first must be a bool, got str"):
        engine.get_variant("multi-head", embed_dim=8, num_heads=2, batch_first="no")


def test_every_option_combination_float64_exact_on_reference():
    """All 2 x 2 x 2 combinations of the three options at float64, one backend: a cheap sweep that
    catches an option interfering with another."""
    rng = np.random.default_rng(7)
    for bkv, za, bf in itertools.product([False, True], repeat=3):
        variant, mha = _pair(np.float64, add_bias_kv=bkv, add_zero_attn=za, batch_first=bf)
        x = rng.standard_normal((4, 2, 16) if not bf else (2, 4, 16))
        out, w = variant(x, need_weights=True, backend="reference")
        t_out, t_w = mha(_t(x), _t(x), _t(x))
        _compare(out, w, t_out, t_w, np.float64, True, variant.param("out_proj.bias"))
