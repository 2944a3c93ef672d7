"""Every registered variant on every available backend against the reference backend."""

import numpy as np
import pytest

import engine

from conftest import available_backends, variant_names

BACKENDS = [b for b in available_backends() if b != "reference"]


def _params(name, embed_dim, num_heads):
    from engine.plugins.registry import variant_info

    return variant_info()[0][name].cls.example_params(embed_dim, num_heads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", variant_names())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,L,S", [(1, 1, 1), (2, 67, 67), (3, 130, 300), (1, 300, 5)])
def test_variant_backend_matches_reference(backend, name, dtype, N, L, S):
    variant = engine.get_variant(name, **_params(name, 32, 4), seed=0, dtype=dtype)
    inputs = variant.example_inputs(N, L, key_length=S, rng=7)
    S_eff = inputs.get("key", inputs["query"]).shape[1]
    kpm = np.zeros((N, S_eff), dtype=bool)
    kpm[:, S_eff - S_eff // 3 :] = True if S_eff > 2 else False
    out, w = variant(**inputs, key_padding_mask=kpm, need_weights=True, backend=backend)
    ref, ref_w = variant(**inputs, key_padding_mask=kpm, need_weights=True, backend="reference")
    assert out.dtype == dtype and out.shape == ref.shape == (N, L, variant.embed_dim)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(w, ref_w, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", variant_names())
def test_seed_reproducible_and_state_dict_round_trip(name):
    a = engine.get_variant(name, **_params(name, 16, 2), seed=3)
    b = engine.get_variant(name, **_params(name, 16, 2), seed=3)
    c = engine.get_variant(name, **_params(name, 16, 2), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert any(not np.array_equal(sa[k], sc[k]) for k in sa)
    c.load_state_dict(sa)
    x = a.example_inputs(2, 9, rng=0)
    np.testing.assert_array_equal(a(**x)[0], c(**x)[0])
    sa[next(iter(sa))] += 1.0  # state_dict() returns copies
    assert not np.array_equal(sa[next(iter(sa))], a.state_dict()[next(iter(sa))])


def test_state_dict_uses_torch_names():
    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2)
    assert {k: v.shape for k, v in mh.state_dict().items()} == {
        "in_proj_weight": (24, 8),
        "in_proj_bias": (24,),
        "out_proj.weight": (8, 8),
        "out_proj.bias": (8,),
    }
    cross = engine.get_variant("cross", embed_dim=8, num_heads=2, kdim=3, vdim=5)
    assert {k: v.shape for k, v in cross.state_dict().items()} == {
        "q_proj_weight": (8, 8),
        "k_proj_weight": (8, 3),
        "v_proj_weight": (8, 5),
        "in_proj_bias": (24,),
        "out_proj.weight": (8, 8),
        "out_proj.bias": (8,),
    }
    assert set(engine.get_variant("self", embed_dim=8).state_dict()) == {"in_proj_weight", "in_proj_bias"}


def test_load_state_dict_rejects_bad_keys_shapes_dtypes():
    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    good = mh.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['out_proj.bias'\].*unexpected keys \['bogus'\]"):
        mh.load_state_dict({**{k: v for k, v in good.items() if k != "out_proj.bias"}, "bogus": good["in_proj_bias"]})
    with pytest.raises(ValueError, match=r"state_dict\['in_proj_weight'\] has shape \(8, 8\), expected \(24, 8\)"):
        mh.load_state_dict({**good, "in_proj_weight": np.zeros((8, 8))})
    with pytest.raises(TypeError, match=r"state_dict\['in_proj_bias'\] must be floating, got dtype int64"):
        mh.load_state_dict({**good, "in_proj_bias": np.zeros(24, dtype=np.int64)})
    after = mh.state_dict()
    assert all(np.array_equal(after[k], good[k]) for k in good)  # all or nothing


def test_masked_variant_is_causal():
    m = engine.get_variant("masked", embed_dim=8, num_heads=2, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 6, 8)).astype(np.float32)
    _, w = m(x, need_weights=True)
    assert np.all(np.triu(w[0], 1) == 0) and np.allclose(w[0].sum(-1), 1)
    y = x.copy()
    y[0, 4:] += 10.0  # changing the future must not change the past
    np.testing.assert_allclose(m(y)[0][0, :4], m(x)[0][0, :4], atol=1e-6)


def test_variant_call_errors():
    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2)
    x = np.zeros((2, 5, 8), np.float32)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 5\), got \(2, 4\)"):
        mh(x, key_padding_mask=np.zeros((2, 4), bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(5, 5\) or \(N \* num_heads"):
        mh(x, attn_mask=np.zeros((3, 5), bool))
    with pytest.raises(ValueError, match="query has 7 features, expected 8"):
        mh(np.zeros((2, 5, 7), np.float32))
    with pytest.raises(TypeError, match="query must be floating, got dtype int64"):
        mh(np.zeros((2, 5, 8), np.int64))
    with pytest.raises(ValueError, match="embed_dim \\(10\\) must be divisible by num_heads \\(3\\)"):
        engine.get_variant("multi-head", embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="'cross' variant needs key"):
        engine.get_variant("cross", embed_dim=8, num_heads=2)(x)
    with pytest.raises(ValueError, match="'self' variant computes keys and values from query"):
        engine.get_variant("self", embed_dim=8)(x, x)


def _accepts_key(name) -> bool:
    """Whether a variant takes a separate key/value sequence (self-attention variants refuse one)."""
    variant = engine.get_variant(name, **_params(name, 8, 2), seed=0)
    inputs = variant.example_inputs(1, 2, key_length=3, rng=0)
    if "key" in inputs:
        return True
    x = inputs["query"]
    try:
        variant(**inputs, key=x, value=x, backend="reference")
    except ValueError as exc:
        if "pass only query" in str(exc):
            return False
        raise
    return True


#: (N, L, S) with a zero somewhere; S != L only for variants that take a key/value sequence
ZERO_SIZES = [(2, 0, 0), (0, 5, 5), (2, 5, 0), (2, 0, 3)]
ZERO_CASES = [
    (name, sizes) for name in variant_names() for sizes in ZERO_SIZES if sizes[1] == sizes[2] or _accepts_key(name)
]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("name,sizes", ZERO_CASES, ids=[f"{n}-{s}" for n, s in ZERO_CASES])
@pytest.mark.parametrize("need_weights", [False, True])
def test_zero_size_inputs_give_torchs_empty_or_key_less_results(backend, name, sizes, need_weights):
    """N = 0 or L = 0 give empty outputs; S = 0 gives zero attention, so the rows of a variant with
    an output projection equal ``out_proj.bias`` (torch.nn.MultiheadAttention does the same)."""
    from variants.multi_head import MultiHeadAttention

    N, L, S = sizes
    variant = engine.get_variant(name, **_params(name, 8, 2), seed=0)
    inputs = variant.example_inputs(max(N, 1), max(L, 1), key_length=max(S, 1), rng=1)
    inputs = {k: v[:N, :L] if k in ("query", "document_ids") else v[:N, :S] for k, v in inputs.items()}
    if S != L and "key" not in inputs:
        inputs["key"] = inputs["value"] = np.zeros((N, S, variant.embed_dim), variant.dtype)
    out, w = variant(**inputs, need_weights=need_weights, backend=backend)
    assert out.shape == (N, L, variant.embed_dim) and out.dtype == variant.dtype
    if need_weights:
        assert w.shape == (N, L, S)
    else:
        assert w is None
    if isinstance(variant, MultiHeadAttention) and out.size:  # S = 0: no key, zero attention
        bias = variant.param("out_proj.bias") if variant.out_projection else np.zeros(variant.embed_dim)
        np.testing.assert_array_equal(out, np.broadcast_to(bias, out.shape))


def test_zero_key_length_matches_torch():
    import torch

    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        mha.out_proj.bias.uniform_(-1, 1)
    variant = engine.get_variant("multi-head", embed_dim=8, num_heads=2)
    variant.load_state_dict(mha.state_dict())
    x, empty = np.ones((2, 5, 8), np.float32), np.zeros((2, 0, 8), np.float32)
    out, w = variant(x, empty, empty, need_weights=True)
    t_out, t_w = mha(*(torch.from_numpy(a) for a in (x, empty, empty)))
    np.testing.assert_allclose(out, t_out.detach().numpy(), atol=1e-6)
    assert w.shape == tuple(t_w.shape) == (2, 5, 0)
