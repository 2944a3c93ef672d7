"""``static_k``/``static_v`` on the multi-head variants: the precomputed keys and values of
``torch.nn.functional.multi_head_attention_forward``, ``(N * num_heads, S, head_dim)``, used
instead of projecting ``key``/``value`` (PyTorch's own MultiheadAttention tests, re-expressed).
Before, the variants refused them as unexpected keyword arguments."""

import numpy as np
import pytest

import engine

from conftest import variant_names

torch = pytest.importorskip("torch")
F = torch.nn.functional

E, H, N, L, S = 32, 4, 2, 5, 7


def _torch_mha(add_zero_attn=False, seed=0):
    torch.manual_seed(seed)
    return torch.nn.MultiheadAttention(E, H, dtype=torch.float64, add_zero_attn=add_zero_attn).eval()


def _torch_forward(m, x, key, static_k, static_v, **kw):
    """torch's functional forward in its (L, N, E) layout."""
    return F.multi_head_attention_forward(
        x,
        key,
        key,
        E,
        H,
        m.in_proj_weight,
        m.in_proj_bias,
        None,
        None,
        m.add_zero_attn,
        0.0,
        m.out_proj.weight,
        m.out_proj.bias,
        training=False,
        static_k=static_k,
        static_v=static_v,
        **kw,
    )


@pytest.mark.parametrize("add_zero_attn", [False, True])
@pytest.mark.parametrize("which", ["both", "static_k", "static_v"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_equals_torchs_functional_forward(which, add_zero_attn, batch_first):
    m = _torch_mha(add_zero_attn)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(L, N, E, dtype=torch.float64, generator=gen)
    key = torch.randn(S, N, E, dtype=torch.float64, generator=gen)
    sk = torch.randn(N * H, S, E // H, dtype=torch.float64, generator=gen) if which != "static_v" else None
    sv = torch.randn(N * H, S, E // H, dtype=torch.float64, generator=gen) if which != "static_k" else None
    pad = torch.zeros(N, S, dtype=torch.float64)  # float, like attn_mask (torch warns on mixed kinds)
    pad[1, 4:] = -torch.inf
    mask = torch.randn(L, S, dtype=torch.float64, generator=gen)
    out, w = _torch_forward(
        m, x, key, sk, sv, key_padding_mask=pad, attn_mask=mask, need_weights=True, average_attn_weights=False
    )
    variant = engine.get_variant(
        "multi-head", embed_dim=E, num_heads=H, dtype=np.float64, add_zero_attn=add_zero_attn, batch_first=batch_first
    )
    variant.load_state_dict(m.state_dict())
    xs, ks = (x, key) if not batch_first else (x.transpose(0, 1), key.transpose(0, 1))
    got, got_w = variant(
        xs,
        ks,
        ks,
        key_padding_mask=pad,
        attn_mask=mask,
        need_weights=True,
        average_attn_weights=False,
        static_k=sk,
        static_v=sv,
    )
    want = out.detach().numpy() if not batch_first else out.detach().numpy().transpose(1, 0, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got_w, w.detach().numpy(), rtol=0, atol=1e-13)


def test_unbatched_input_takes_num_heads_static_rows():
    m = _torch_mha()
    gen = torch.Generator().manual_seed(2)
    x, key = (
        torch.randn(L, E, dtype=torch.float64, generator=gen),
        torch.randn(S, E, dtype=torch.float64, generator=gen),
    )
    sk, sv = (torch.randn(H, S, E // H, dtype=torch.float64, generator=gen) for _ in range(2))
    out, _ = _torch_forward(m, x, key, sk, sv, need_weights=False)
    variant = engine.get_variant("multi-head", embed_dim=E, num_heads=H, dtype=np.float64)
    variant.load_state_dict(m.state_dict())
    got, _ = variant(x.numpy(), key.numpy(), key.numpy(), static_k=sk.numpy(), static_v=sv.numpy())
    np.testing.assert_allclose(got, out.detach().numpy(), rtol=0, atol=1e-13)


def _multi_head_variants():
    from engine.plugins.registry import variant_info
    from variants.multi_head import MultiHeadAttention

    info = variant_info()[0]
    return [n for n in variant_names() if issubclass(info[n].cls, MultiHeadAttention)]


@pytest.mark.parametrize("name", _multi_head_variants())
def test_static_keys_equal_to_the_projected_ones_change_nothing(name):
    """On every multi-head variant (GQA's with its key/value heads): static_k/static_v holding
    exactly the projections of key/value give the call's own result."""
    from engine.plugins.registry import variant_info

    variant = engine.get_variant(name, **variant_info()[0][name].cls.example_params(E, H), seed=0, dtype=np.float64)
    inputs = variant.example_inputs(N, 6, key_length=9, rng=3)
    call_key = {n: inputs.pop(n) for n in ("key", "value") if n in inputs}  # self-attention variants take none
    query = inputs.pop("query")
    key = call_key.get("key", query)
    value = call_key.get("value", key)
    wq, wk, wv, bq, bk, bv = variant.projection_weights()
    heads = variant.kv_width // variant.head_dim

    def static(x, w, b):
        y = x @ w.T + (0 if b is None else b)  # (N, S, heads * head_dim)
        return y.reshape(N, -1, heads, variant.head_dim).transpose(0, 2, 1, 3).reshape(N * heads, -1, variant.head_dim)

    sk, sv = static(key, wk, bk), static(value, wv, bv)
    want, want_w = variant(query, **call_key, need_weights=True, **inputs)
    got, got_w = variant(query, **call_key, need_weights=True, static_k=sk, static_v=sv, **inputs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_w, want_w, rtol=0, atol=1e-12)


def test_bad_static_arguments_are_refused_by_name():
    variant = engine.get_variant("multi-head", embed_dim=E, num_heads=H, dtype=np.float64)
    x = np.zeros((N, L, E))
    with pytest.raises(ValueError, match=r"static_k must have shape \(N \* num_heads, S, head_dim\) = \(8, 'S', 8\)"):
        variant(x, static_k=np.zeros((N, S, E)))
    with pytest.raises(ValueError, match=r"static_v must have shape .* got \(8, 7, 4\)"):
        variant(x, static_v=np.zeros((N * H, S, 4)))
    with pytest.raises(ValueError, match=r"got 7 keys \(static_k\) and 5 values \(value\)"):
        variant(x, static_k=np.zeros((N * H, S, E // H)))
    with pytest.raises(TypeError, match=r"static_k must be floating"):
        variant(x, static_k=np.zeros((N * H, L, E // H), dtype=np.int32))
    biased = engine.get_variant("multi-head", embed_dim=E, num_heads=H, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"static_k cannot be combined with add_bias_kv"):
        biased(x.astype(np.float32), static_k=np.zeros((N * H, L, E // H)))
