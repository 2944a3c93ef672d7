"""Parity with PyTorch: the functional API against F.scaled_dot_product_attention, and the
variants against nn.MultiheadAttention(batch_first=True) with the same weights.

torch is a test requirement (``.ci/run`` installs it); these tests fail, never skip, without it.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine

from conftest import available_backends, randn

TOL = {np.float32: 1e-5, np.float64: 1e-10}
BACKENDS = available_backends()


def _t(x):
    return None if x is None else torch.from_numpy(np.ascontiguousarray(x))


def _sdpa_case(rng, dtype, case):
    """Inputs and kwargs for one named case; shapes are not tile multiples."""
    B, Hq, H, L, S, E, Ev = 2, 4, 4, 37, 91, 16, 16
    kw = {}
    if case == "gqa":
        H = 2
        kw["enable_gqa"] = True
    if case == "e_ne_ev":
        Ev = 24
    if case.startswith("causal"):
        kw["is_causal"] = True
        L, S = {"causal_l_lt_s": (37, 91), "causal_l_gt_s": (91, 37)}[case]
    q, k, v = randn(rng, (B, Hq, L, E), dtype), randn(rng, (B, H, S, E), dtype), randn(rng, (B, H, S, Ev), dtype)
    if case == "bool_mask":
        m = rng.random((B, 1, L, S)) > 0.3
        m[0, 0, 3] = False  # a fully masked row
        kw["attn_mask"] = m
    if case == "float_mask":
        kw["attn_mask"] = randn(rng, (Hq, L, S), dtype)
    if case == "float_mask_inf":
        kw["attn_mask"] = np.where(rng.random((L, S)) > 0.3, 0.25, -np.inf).astype(dtype)
    if case == "scale":
        kw["scale"] = 0.05
    return q, k, v, kw


CASES = [
    "plain",
    "bool_mask",
    "float_mask",
    "float_mask_inf",
    "causal_l_lt_s",
    "causal_l_gt_s",
    "gqa",
    "e_ne_ev",
    "scale",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_sdpa_matches_torch(backend, dtype, case, rng):
    q, k, v, kw = _sdpa_case(rng, dtype, case)
    out = engine.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    tkw = {key: (_t(val) if isinstance(val, np.ndarray) else val) for key, val in kw.items()}
    expected = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), **tkw).numpy()
    assert out.dtype == expected.dtype
    np.testing.assert_allclose(out, expected, atol=TOL[dtype], rtol=0)


def _torch_mha(variant, dtype, seed):
    """A torch MHA with random (non-zero) biases, its weights loaded into ``variant``."""
    torch.manual_seed(seed)
    kdim = getattr(variant, "kdim", None)
    vdim = getattr(variant, "vdim", None)
    mha = torch.nn.MultiheadAttention(
        variant.embed_dim,
        variant.num_heads,
        batch_first=True,
        kdim=kdim,
        vdim=vdim,
        dtype=torch.float64 if dtype == np.float64 else torch.float32,
    )
    with torch.no_grad():
        for p in mha.parameters():
            p.uniform_(-0.5, 0.5)
    variant.load_state_dict(mha.state_dict())
    return mha.eval()


MHA_VARIANTS = [
    ("multi-head", {"embed_dim": 32, "num_heads": 4}),
    ("cross", {"embed_dim": 32, "num_heads": 4, "kdim": 12, "vdim": 20}),
    ("masked", {"embed_dim": 32, "num_heads": 2}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,params", MHA_VARIANTS, ids=[n for n, _ in MHA_VARIANTS])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_variants_match_torch_mha(backend, dtype, name, params, need_weights, average, rng):
    variant = engine.get_variant(name, dtype=dtype, seed=0, **params)
    mha = _torch_mha(variant, dtype, seed=1)
    N, L = 3, 29
    S = 41 if name == "cross" else L
    q = randn(rng, (N, L, 32), dtype)
    if name == "cross":
        k, v = randn(rng, (N, S, 12), dtype), randn(rng, (N, S, 20), dtype)
    else:
        k = v = q
    kpm = np.zeros((N, S), dtype=bool)
    kpm[0, -5:] = True  # padding at the end of the first sequence
    if name == "masked":
        kpm[2, -2:] = True  # front padding + causal would fully mask row 0: torch MHA gives NaN there
    else:
        kpm[2, :3] = True  # padding at the start of the third sequence
    call = dict(key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=average)
    if name == "cross":
        out, w = variant(q, k, v, backend=backend, **call)
    else:
        out, w = variant(q, backend=backend, **call)
    tkw = dict(key_padding_mask=_t(kpm), need_weights=need_weights, average_attn_weights=average)
    if name == "masked":
        tkw["attn_mask"] = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    with torch.no_grad():
        t_out, t_w = mha(_t(q), _t(k), _t(v), **tkw)
    np.testing.assert_allclose(out, t_out.numpy(), atol=TOL[dtype], rtol=0)
    if need_weights:
        assert w.shape == tuple(t_w.shape)
        np.testing.assert_allclose(w, t_w.numpy(), atol=TOL[dtype], rtol=0)
    else:
        assert w is None and t_w is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool2d", "float3d", "bool_and_kpm_float"])
def test_multi_head_attn_mask_kinds_match_torch(backend, mask_kind, rng):
    variant = engine.get_variant("multi-head", embed_dim=16, num_heads=2, seed=0)
    mha = _torch_mha(variant, np.float32, seed=2)
    N, L = 2, 19
    x = randn(rng, (N, L, 16))
    kw = {}
    if mask_kind == "bool2d":
        kw["attn_mask"] = rng.random((L, L)) > 0.7  # True = not allowed
        np.fill_diagonal(kw["attn_mask"], False)
    elif mask_kind == "float3d":
        kw["attn_mask"] = randn(rng, (N * 2, L, L))
    else:
        kw["attn_mask"] = np.triu(np.ones((L, L), bool), 1)
        kpm = np.zeros((N, L), np.float32)
        kpm[1, 4] = -np.inf
        kpm[0, 0] = 0.5
        kw["key_padding_mask"] = kpm
    out, w = variant(x, need_weights=True, backend=backend, **kw)
    with torch.no_grad():
        t_out, t_w = mha(_t(x), _t(x), _t(x), **{k: _t(v) for k, v in kw.items()})
    np.testing.assert_allclose(out, t_out.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(w, t_w.numpy(), atol=1e-5, rtol=0)


def test_self_variant_matches_single_head_torch_without_out_proj(rng):
    variant = engine.get_variant("self", embed_dim=24, seed=0)
    mha = torch.nn.MultiheadAttention(24, 1, batch_first=True)
    with torch.no_grad():
        for p in mha.parameters():
            p.uniform_(-0.5, 0.5)
        mha.out_proj.weight.copy_(torch.eye(24))
        mha.out_proj.bias.zero_()
    sd = {k: v for k, v in mha.state_dict().items() if not k.startswith("out_proj")}
    variant.load_state_dict(sd)
    x = randn(rng, (2, 13, 24))
    out, _ = variant(x)
    with torch.no_grad():
        t_out, _ = mha(_t(x), _t(x), _t(x))
    np.testing.assert_allclose(out, t_out.numpy(), atol=1e-5, rtol=0)


def test_unbatched_input_matches_torch(rng):
    variant = engine.get_variant("multi-head", embed_dim=16, num_heads=4, seed=0)
    mha = _torch_mha(variant, np.float32, seed=3)
    x = randn(rng, (11, 16))
    out, w = variant(x, need_weights=True)
    with torch.no_grad():
        t_out, t_w = mha(_t(x), _t(x), _t(x))
    assert out.shape == (11, 16) and w.shape == (11, 11)
    np.testing.assert_allclose(out, t_out.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(w, t_w.numpy(), atol=1e-5, rtol=0)


def test_torch_cpu_tensors_are_accepted(rng):
    q = randn(rng, (1, 2, 9, 8))
    out = engine.scaled_dot_product_attention(_t(q), _t(q), _t(q))
    np.testing.assert_allclose(out, engine.scaled_dot_product_attention(q, q, q), atol=1e-6)
