"""The ``cpu`` backward completes: a bottom-right causal mask with L != S (``engine.causal_lower_right``
and torch's ``causal_lower_right``) and float16/bfloat16 inputs (computed in float32), against torch
float64 autograd.

16-bit rule (FlashAttention's): the error against the float64 truth is at most twice that of
torch's own autograd of the same attention computed in the 16-bit dtype (plus one 16-bit ulp of
the gradient's size, for gradients torch happens to get nearly exact).
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import engine
import engine.backends.cpu.tiles as cpu_tiles
import engine.torch as et

BF16 = np.dtype(ml_dtypes.bfloat16)
TORCH = {np.dtype(np.float16): torch.float16, BF16: torch.bfloat16, np.dtype(np.float32): torch.float32}
ULP = {np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(cpu_tiles, "CPU_BIG_BLOCK_Q", 8)
    monkeypatch.setattr(cpu_tiles, "CPU_BLOCK_K", 24)
    monkeypatch.setattr(cpu_tiles, "CPU_BWD_BLOCK_Q", 16)


def _torch_grads(q, k, v, do, L, S, lower_right, dtype):
    """torch autograd of attention in torch ops, in ``dtype`` (rows with no key: zeros)."""
    t = lambda x: torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype, requires_grad=True)  # noqa: E731
    leaves = [t(q), t(k), t(v)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) / math.sqrt(q.shape[-1])
    if lower_right is not None:
        off = S - L if lower_right else 0
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril(off).logical_not(), -math.inf)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    (p @ leaves[2]).backward(torch.tensor(np.asarray(do, dtype=np.float64), dtype=dtype))
    return [x.grad.double().numpy() for x in leaves]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("L, S", [(37, 53), (53, 37), (5, 60), (60, 5)])
def test_cpu_bottom_right_causal_matches_torch_autograd(L, S, dtype, small_tiles):
    rng = np.random.default_rng(L * S)
    q, k, v = (rng.standard_normal((2, 2, n, 8)).astype(dtype) for n in (L, S, S))
    mask = engine.causal_lower_right(L, S)
    out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True, backend="cpu")
    do = rng.standard_normal(out.shape).astype(dtype)
    got = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, attn_mask=mask, backend="cpu")
    truth = _torch_grads(q, k, v, do, L, S, True, torch.float64)
    own = _torch_grads(q, k, v, do, L, S, True, torch.float32)
    for name, g, ref, mine in zip(("dq", "dk", "dv"), got, truth, own):
        err = float(np.max(np.abs(g - ref)))
        if dtype == np.float64:
            allowed = 1e-10
        else:
            allowed = 2 * float(np.max(np.abs(mine - ref))) + 2 * 2.0**-24 * float(np.max(np.abs(ref)))
        assert err <= allowed, f"{name}: {err:.3g} > {allowed:.3g}"


def test_engine_torch_with_torchs_causal_bias_matches_torch_sdpa():
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 13, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    bias = causal_lower_right(6, 13)
    out = et.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="cpu")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_cpu_takes_the_16_bit_and_bottom_right_backward_problems_itself():
    """No longer handed to ``reference``: ``auto`` picks ``cpu``."""
    from engine.dispatch import select_backend
    from engine.problems.backward import validate_backward_args

    rng = np.random.default_rng(0)
    for dt, mask in (
        (BF16, None),
        (np.dtype(np.float16), None),
        (np.dtype(np.float32), engine.causal_lower_right(3, 7)),
    ):
        q, k, v = (rng.standard_normal((1, 2, n, 8)).astype(dt) for n in (3, 7, 7))
        out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
        problem = validate_backward_args(np.ones_like(out), q, k, v, out, lse, mask)
        assert select_backend("auto", problem).name == "cpu"


@pytest.mark.parametrize("lower_right", [None, True])
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_cpu_16_bit_gradients_meet_flashattentions_rule(dtype, lower_right, small_tiles):
    L, S = 37, 53
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 2, n, 16)).astype(dtype) for n in (L, S, S))
    do = rng.standard_normal((2, 2, L, 16)).astype(dtype)
    kw = {} if lower_right is None else {"attn_mask": engine.causal_lower_right(L, S)}
    out, lse16 = engine.scaled_dot_product_attention(q, k, v, return_lse=True, backend="cpu", **kw)
    # the lse engine.torch keeps (float32, as FlashAttention's): the float32 forward of the same inputs
    _, lse = engine.scaled_dot_product_attention(
        *(a.astype(np.float32) for a in (q, k, v)), return_lse=True, backend="cpu", **kw
    )
    got = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
    for g, x in zip(got, (q, k, v)):
        assert g.dtype == dtype and g.shape == x.shape
    truth = _torch_grads(q, k, v, do, L, S, lower_right, torch.float64)
    own = _torch_grads(q, k, v, do, L, S, lower_right, TORCH[dtype])
    for name, g, ref, mine in zip(("dq", "dk", "dv"), got, truth, own):
        err = float(np.max(np.abs(g.astype(np.float64) - ref)))
        allowed = 2 * float(np.max(np.abs(mine - ref))) + ULP[dtype] * float(np.max(np.abs(ref)))
        assert err <= allowed, f"{name}: {err:.3g} > {allowed:.3g}"
    # the 16-bit lse the NumPy forward returns is accepted too (less accurate: docs/cuda.md)
    engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse16, backend="cpu", **kw)


@pytest.mark.parametrize("tdtype", [torch.float16, torch.bfloat16])
def test_engine_torch_trains_16_bit_on_the_cpu_backend(tdtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 29, 16, generator=gen).to(tdtype).requires_grad_() for _ in range(3))
    out = et.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    do = torch.randn(out.shape, generator=gen).to(tdtype)
    got = torch.autograd.grad(out, (q, k, v), do)
    truth = _torch_grads(*(x.detach().float().numpy() for x in (q, k, v, do)), 29, 29, False, torch.float64)
    own = _torch_grads(*(x.detach().float().numpy() for x in (q, k, v, do)), 29, 29, False, tdtype)
    ulp = 2.0**-11 if tdtype == torch.float16 else 2.0**-8
    for g, ref, mine in zip(got, truth, own):
        assert g.dtype == tdtype
        err = float((g.double() - torch.from_numpy(ref)).abs().max())
        assert err <= 2 * float(np.max(np.abs(mine - ref))) + ulp * float(np.max(np.abs(ref)))


@pytest.mark.parametrize("tdtype", [torch.float16, torch.bfloat16])
def test_a_learned_bias_trains_with_16_bit_inputs(tdtype):
    """16-bit q, k, v with a float32 table read by a score_mod: every gradient within
    FlashAttention's rule against torch float64 (torch's own: the same ops in the 16-bit dtype)."""
    from engine.models.relative_bias import dense_bias, relative_bias

    gen = torch.Generator().manual_seed(2)
    L = 23
    q, k, v, do = (torch.randn(2, 2, L, 16, generator=gen).to(tdtype) for _ in range(4))
    table = 0.5 * torch.randn(2, 2 * L - 1, generator=gen)

    def torch_grads(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, table)]
        s = leaves[0] @ leaves[1].transpose(-1, -2) / 4 + dense_bias(leaves[3], None, L, L)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).tril().logical_not(), -math.inf)
        (torch.softmax(s, -1) @ leaves[2]).backward(do.to(dtype))
        return [x.grad.double() for x in leaves]

    leaves = [x.detach().requires_grad_() for x in (q, k, v, table)]
    out = et.scaled_dot_product_attention(
        *leaves[:3], is_causal=True, score_mod=relative_bias, mod_args=(leaves[3], L - 1), backend="cpu"
    )
    out.backward(do)
    truth, own = torch_grads(torch.float64), torch_grads(tdtype)
    ulp = 2.0**-11 if tdtype == torch.float16 else 2.0**-8
    for name, x, ref, mine in zip(("dq", "dk", "dv", "dtable"), leaves, truth, own):
        assert x.grad.dtype == x.dtype
        err = float((x.grad.double() - ref).abs().max())
        allowed = 2 * float((mine - ref).abs().max()) + ulp * float(ref.abs().max())
        assert err <= allowed, f"{name}: {err:.3g} > {allowed:.3g}"
