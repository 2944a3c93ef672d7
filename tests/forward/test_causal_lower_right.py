"""``engine.causal_lower_right(L, S)`` as ``attn_mask``: torch's bottom-right causal semantics, run by
the kernels as a causal flag with a diagonal offset (no L x S mask)."""

import numpy as np
import pytest

import engine
from engine.problems.causal import CausalBias, causal_upper_left

from conftest import available_backends, randn
from testmods import linear_bias, skip_every_third_key
from tolerances import assert_out_close, lse_atol, out_atol

f = engine.scaled_dot_product_attention
OFFSET_BACKENDS = [n for n in available_backends() if engine.get_backend(n).supports_causal_offset]

# (L, S): decoding, chunked prefill, square, more queries than keys; tile-crossing sizes for cpu
SHAPES = [(1, 9), (4, 11), (7, 7), (11, 4), (130, 600), (600, 130)]


# the oracle checks the small shapes; the other backends the tile-crossing ones too
CASES = [(b, L, S) for b in OFFSET_BACKENDS for L, S in SHAPES if b != "reference" or L * S < 10_000]


@pytest.mark.parametrize("backend, L, S", CASES)
def test_equals_the_materialised_mask(rng, backend, L, S):
    B, Hq, H, E = 2, 4, 2, 16
    q, k, v = randn(rng, (B, Hq, L, E)), randn(rng, (B, H, S, E)), randn(rng, (B, H, S, 8))
    dense = np.tril(np.ones((L, S), bool), k=S - L)
    want, want_lse = f(q, k, v, attn_mask=dense, enable_gqa=True, backend="reference", return_lse=True)
    out, lse = f(q, k, v, attn_mask=engine.causal_lower_right(L, S), enable_gqa=True, backend=backend, return_lse=True)
    assert_out_close(out, want, out_atol(np.float32, q, k, v, None))
    assert_out_close(lse, want_lse, lse_atol(np.float32, q, k, None), what="lse")
    if L > S:  # rows that see no key: zeros and -inf, as torch
        assert np.all(out[:, :, : L - S] == 0) and np.all(np.isneginf(lse[:, :, : L - S]))


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
def test_against_torch(rng, backend):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.bias import causal_lower_right as torch_lower_right

    q, k, v = randn(rng, (1, 2, 5, 8)), randn(rng, (1, 2, 12, 8)), randn(rng, (1, 2, 12, 8))
    want = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), attn_mask=torch_lower_right(5, 12)
    ).numpy()
    for mask in (engine.causal_lower_right(5, 12), torch_lower_right(5, 12)):  # torch's object too
        np.testing.assert_allclose(f(q, k, v, attn_mask=mask, backend=backend), want, atol=2e-6)


@pytest.mark.parametrize("backend", OFFSET_BACKENDS)
def test_with_score_mod_and_mask_mod(rng, backend):
    score_mod, mask_mod = linear_bias, skip_every_third_key
    L, S = 5, 13
    q, k, v = randn(rng, (2, 2, L, 8)), randn(rng, (2, 2, S, 8)), randn(rng, (2, 2, S, 8))
    dense = np.tril(np.ones((L, S), bool), k=S - L) & (np.arange(S) % 3 != 1)
    want = f(q, k, v, attn_mask=dense, backend="reference", score_mod=score_mod)
    out = f(q, k, v, attn_mask=engine.causal_lower_right(L, S), backend=backend, score_mod=score_mod, mask_mod=mask_mod)
    assert_out_close(out, want, out_atol(np.float32, q, k, v, None) * 4)


def test_no_dense_mask_is_built(rng, monkeypatch):
    def refuse(self):
        raise AssertionError("materialize() called")

    monkeypatch.setattr(CausalBias, "materialize", refuse)
    from engine.problems.attention import validate_attention_args

    q, k = randn(rng, (1, 1, 3, 4)), randn(rng, (1, 1, 9, 4))
    problem = validate_attention_args(q, k, k, attn_mask=engine.causal_lower_right(3, 9))
    assert problem.attn_mask is None and problem.is_causal and problem.causal_offset == 6
    for backend in OFFSET_BACKENDS:
        f(q, k, k, attn_mask=engine.causal_lower_right(3, 9), backend=backend)


def test_upper_left_is_is_causal(rng):
    q, k = randn(rng, (1, 2, 6, 4)), randn(rng, (1, 2, 9, 4))
    np.testing.assert_array_equal(
        f(q, k, k, attn_mask=causal_upper_left(6, 9), backend="reference"),
        f(q, k, k, is_causal=True, backend="reference"),
    )


def test_backends_without_offsets_refuse_clearly(rng):
    from engine.problems.attention import validate_attention_args

    q, k = randn(rng, (1, 1, 3, 4)), randn(rng, (1, 1, 9, 4))
    problem = validate_attention_args(q, k, k, attn_mask=engine.causal_lower_right(3, 9))
    square = validate_attention_args(q, k[:, :, :3], k[:, :, :3], attn_mask=engine.causal_lower_right(3, 3))
    for name in engine.list_backends():
        backend = engine.get_backend(name)
        reasons = " ".join(backend.not_supported_reasons(problem))
        assert ("bottom-right causal" in reasons) == (not backend.supports_causal_offset)
        assert "bottom-right causal" not in " ".join(backend.not_supported_reasons(square))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (
            lambda q, k: f(q, k, k, attn_mask=engine.causal_lower_right(3, 8)),
            ValueError,
            r"is for \(L, S\) = \(3, 8\), but the inputs have \(L, S\) = \(3, 9\)",
        ),
        (
            lambda q, k: f(q, k, k, attn_mask=engine.causal_lower_right(3, 9), is_causal=True),
            ValueError,
            r"either attn_mask or is_causal=True",
        ),
        (lambda q, k: engine.causal_lower_right(-1, 4), ValueError, r"seq_len_q must be a non-negative int"),
        (lambda q, k: engine.causal_lower_right(2, 4.0), ValueError, r"seq_len_kv must be a non-negative int"),
    ],
)
def test_bad_arguments(rng, call, exc, words):
    q, k = randn(rng, (1, 1, 3, 4)), randn(rng, (1, 1, 9, 4))
    with pytest.raises(exc, match=words):
        call(q, k)


def test_materialize_and_immutability():
    np.testing.assert_array_equal(engine.causal_lower_right(2, 4).materialize(), [[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(AttributeError):
        engine.causal_lower_right(2, 4).seq_len_q = 3


def test_backward_equals_the_materialised_mask_on_every_backend(rng):
    """The reference and cpu backwards apply the offset tile by tile, as the dense mask does."""
    L, S = 4, 11
    q, k, v = randn(rng, (2, 2, L, 8)), randn(rng, (2, 2, S, 8)), randn(rng, (2, 2, S, 8))
    dense = np.tril(np.ones((L, S), bool), k=S - L)
    out, lse = f(q, k, v, attn_mask=dense, return_lse=True, backend="reference")
    g = randn(rng, out.shape)
    want = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, attn_mask=dense, backend="reference")
    bias = engine.causal_lower_right(L, S)
    got = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, attn_mask=bias)
    for w, x in zip(want, got):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-6)
    got = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, attn_mask=bias, backend="cpu")
    for w, x in zip(want, got):
        np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-6)


def test_variants_refuse_the_mask_object_by_name():
    """Variants take masks as arrays (as nn.MultiheadAttention); the object gets a TypeError that
    names the argument and says what to pass, not a dtype error about an object array."""
    mha = engine.get_variant("multi-head", embed_dim=8, num_heads=2)
    x = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(TypeError, match=r"attn_mask is a causal mask object \(CausalBias\).*is_causal=True"):
        mha(x, x, x, attn_mask=engine.causal_lower_right(4, 4))
    torch_bias = pytest.importorskip("torch.nn.attention.bias")
    with pytest.raises(TypeError, match="attn_mask is a causal mask object"):
        mha(x, x, x, attn_mask=torch_bias.causal_lower_right(4, 4))
