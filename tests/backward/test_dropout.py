"""Attention dropout: the Philox stream against its published known answers, the same dropped
weights on every backend, tile size and thread count, its statistics, and the backward using the
forward's mask (regenerated from the seed)."""

import math

import numpy as np
import pytest
import torch

import engine
import engine.backends.cpu.tiles as cpu_tiles
from engine.kernels.philox import (
    dropout_threshold,
    keep_mask_numpy,
    keep_scale,
    philox4x32,
    philox4x32_numpy,
    split_seed,
)

from conftest import randn

DROPOUT_BACKENDS = [
    n
    for n in engine.list_backends()
    if engine.get_backend(n).supports_dropout and engine.get_backend(n).unavailable_reason() is None
]

# Random123's kat_vectors for philox4x32 (10 rounds): counter, key, result
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    got = philox4x32(*(np.uint64(c) for c in counter), *(np.uint64(k) for k in key))
    assert tuple(int(w) for w in got) == expected
    got = philox4x32_numpy(*counter, *key)
    assert tuple(int(w) for w in got) == expected


def test_keep_scale_tiles_agree_with_the_dense_mask_whatever_the_tile():
    """Any tile (unaligned to the generator's groups of 4 keys) reads the same decisions."""
    seed, p, B, H, L, S = 2**40 + 12345, 0.3, 2, 3, 9, 23
    dense = keep_mask_numpy(seed, p, B, H, L, S)
    lo, hi = split_seed(seed)
    for b, h, i0, nq, j0, nk in [(1, 2, 0, 9, 0, 23), (0, 1, 3, 4, 5, 7), (1, 0, 8, 1, 22, 1), (0, 0, 2, 5, 1, 3)]:
        zt = np.full((nk + 2, nq + 1), 7.0)
        keep_scale(lo, hi, b, h, i0, nq, j0, nk, np.uint64(dropout_threshold(p)), 2.0, zt)
        np.testing.assert_array_equal(zt[:nk, :nq].T, np.where(dense[b, h, i0 : i0 + nq, j0 : j0 + nk], 2.0, 0.0))
        assert (zt[nk:] == 7.0).all() and (zt[:, nq:] == 7.0).all()  # nothing outside the tile


def test_keep_fraction_is_one_minus_p():
    for p in (0.1, 0.5, 0.9):
        keep = keep_mask_numpy(99, p, 2, 4, 64, 256)
        n = keep.size
        # binomial: 6 standard deviations
        assert abs(keep.mean() - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n), (p, keep.mean())
    assert keep_mask_numpy(1, 1.0, 1, 1, 4, 8).sum() == 0
    assert keep_mask_numpy(1, 0.0, 1, 1, 4, 8).all()
    a, b = keep_mask_numpy(1, 0.5, 1, 2, 16, 16), keep_mask_numpy(2, 0.5, 1, 2, 16, 16)
    assert (a != b).any()  # another seed, other decisions
    assert (a[0, 0] != a[0, 1]).any()  # heads are not correlated copies


def _qkv(rng, B=2, H=2, L=37, S=53, E=8, Ev=8, dtype=np.float64):
    return randn(rng, (B, H, L, E), dtype), randn(rng, (B, H, S, E), dtype), randn(rng, (B, H, S, Ev), dtype)


def _explicit_dropout(q, k, v, seed, p, **kw):
    """torch math path with the engine's keep mask as an explicit tensor (float64 autograd)."""
    B, H, L, _ = q.shape
    S = k.shape[-2]
    keep = torch.from_numpy(keep_mask_numpy(seed, p, B, H, L, S))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    s = tq @ tk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if kw.get("is_causal"):
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    w = torch.softmax(s, dim=-1) * keep / (1 - p)
    return w @ tv, (tq, tk, tv)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_and_backward_against_the_explicit_mask(backend, causal, rng):
    q, k, v = _qkv(rng)
    p, seed = 0.25, 31337
    out, lse = engine.scaled_dot_product_attention(
        q, k, v, is_causal=causal, dropout_p=p, dropout_seed=seed, backend=backend, return_lse=True
    )
    ref, leaves = _explicit_dropout(q, k, v, seed, p, is_causal=causal)
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-12, rtol=0)
    # lse is that of the weights before dropout
    plain_out, plain_lse = engine.scaled_dot_product_attention(
        q, k, v, is_causal=causal, backend="reference", return_lse=True
    )
    np.testing.assert_allclose(lse, plain_lse, atol=1e-12, rtol=0)
    do = randn(rng, out.shape, np.float64)
    ref.backward(torch.from_numpy(do))
    grads = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, is_causal=causal, dropout_p=p, dropout_seed=seed, backend=backend
    )
    for g, t in zip(grads, leaves):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=1e-10, rtol=0)


def test_cpu_dropout_is_the_same_for_every_tile_size_and_thread_count(rng, monkeypatch):
    q, k, v = _qkv(rng, L=70, S=90, dtype=np.float32)
    kw = dict(dropout_p=0.4, dropout_seed=5, backend="cpu")
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    do = randn(rng, out.shape, np.float32)
    ref = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.4, dropout_seed=5, backend="reference")
    ref_grads = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, dropout_p=0.4, dropout_seed=5, backend="reference"
    )
    monkeypatch.setattr(cpu_tiles, "CPU_BIG_BLOCK_Q", 8)  # the forward's query tiles
    monkeypatch.setattr(cpu_tiles, "CPU_BLOCK_K", 24)  # key tiles, both passes
    monkeypatch.setattr(cpu_tiles, "CPU_BWD_BLOCK_Q", 16)  # the backward's query tiles
    for threads in (1, 2):
        engine.set_num_threads(min(threads, engine.get_num_threads()))
        try:
            small = engine.scaled_dot_product_attention(q, k, v, **kw)
            grads = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, **kw)
        finally:
            engine.set_num_threads(None)
        # the same weights are dropped: only rounding differs between tilings
        np.testing.assert_allclose(small, out, atol=2e-6, rtol=0)
        np.testing.assert_allclose(small, ref, atol=2e-6, rtol=0)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=2e-5, rtol=0)


def test_dropout_is_unbiased(rng):
    """The mean of the dropped-out output over many seeds is the output without dropout."""
    q, k, v = _qkv(rng, B=1, H=1, L=4, S=16, E=4, Ev=4)
    plain = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    outs = np.stack(
        [engine.scaled_dot_product_attention(q, k, v, dropout_p=0.3, dropout_seed=s, backend="cpu") for s in range(400)]
    )
    sem = outs.std(axis=0) / math.sqrt(len(outs))
    assert (np.abs(outs.mean(axis=0) - plain) <= 5 * sem + 1e-12).all()


def test_dropout_seed_defaults_and_validation(rng):
    q, k, v = _qkv(rng, B=1, H=1, L=5, S=6)
    np.random.seed(3)
    a = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    np.random.seed(3)
    b = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    np.testing.assert_array_equal(a, b)  # the drawn seed follows NumPy's global generator
    assert not np.array_equal(a, engine.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    out, lse = engine.scaled_dot_product_attention(q, k, v, dropout_p=0.5, dropout_seed=1, return_lse=True)
    with pytest.raises(ValueError, match="dropout_seed"):
        engine.scaled_dot_product_attention_backward(q, q, k, v, out, lse, dropout_p=0.5)
    for bad, err in (
        (-0.1, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        ("0.1", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(err, match="dropout_p"):
            engine.scaled_dot_product_attention(q, k, v, dropout_p=bad)
    for bad, err in ((-1, ValueError), (2**64, ValueError), (1.5, TypeError)):
        with pytest.raises(err, match="dropout_seed"):
            engine.scaled_dot_product_attention(q, k, v, dropout_p=0.1, dropout_seed=bad)


def test_dropout_p_one_drops_everything(rng):
    q, k, v = _qkv(rng, B=1, H=1, L=5, S=6)
    for backend in DROPOUT_BACKENDS:
        out, lse = engine.scaled_dot_product_attention(
            q, k, v, dropout_p=1.0, dropout_seed=0, backend=backend, return_lse=True
        )
        assert (out == 0).all() and np.isfinite(lse).all()
        grads = engine.scaled_dot_product_attention_backward(
            np.ones_like(out), q, k, v, out, lse, dropout_p=1.0, dropout_seed=0, backend=backend
        )
        assert all((g == 0).all() for g in grads)


def test_a_backend_without_dropout_refuses_it(rng):
    """Every built-in backend has dropout (cuda since issue 20): a plugin backend without it
    stands in, and must be refused by name, also by ``auto``'s reasons."""
    from engine.backends.base import Backend, Op
    from engine.backends.reference.forward import attend
    from engine.problems.attention import AttentionProblem

    class ForwardWithoutDropout(Op):
        problem_type = AttentionProblem

        def run(self, problem):
            return attend(problem)

    class NoDropout(Backend):
        name = "no-dropout"
        ops = (ForwardWithoutDropout,)

    class Plugin:
        @engine.hookimpl
        def attention_backends(self):
            return [NoDropout]

    q, k, v = _qkv(rng, B=1, H=1, L=5, S=6)
    problem = engine.problems.attention.validate_attention_args(q, k, v, dropout_p=0.1, dropout_seed=1)
    engine.register_plugin(Plugin(), name="no-dropout-backend")
    try:
        for name in engine.list_backends():
            b = engine.get_backend(name)
            assert ("dropout_p > 0 is not supported by this backend" in b.not_supported_reasons(problem)) == (
                not b.supports_dropout
            ), name
        with pytest.raises(engine.NotSupportedError, match="dropout_p > 0 is not supported"):
            engine.scaled_dot_product_attention(q, k, v, dropout_p=0.1, dropout_seed=1, backend="no-dropout")
    finally:
        engine.unregister_plugin("no-dropout-backend")
