"""``engine.torch``'s call plans (``engine.torch.ops.forward_impl``): a second call with the same
signature skips validation and dispatch, and still gives the right outputs and gradients for new
values, still raises what a full validation raises for bad ones, and keeps apart what its key
separates (gradients wanted or not, the thread count)."""

import math

import numpy as np
import pytest
import torch

import engine
import engine.torch as et
from engine import plan
from engine.torch import calls, ops


@pytest.fixture
def validations(monkeypatch):
    """How many calls of the op ran the full validation since."""
    calls = []
    real = ops.validate_attention_args
    monkeypatch.setattr(ops, "validate_attention_args", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan.invalidate()
    yield lambda: len(calls)
    plan.invalidate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 40])  # (1: the decode op through the plan; 40: the forward kernel)
def test_repeated_calls_take_the_plan_and_stay_right(dtype, L, validations):
    gen = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for step in range(4):
        grad = step % 2 == 1  # the key holds whether gradients are wanted
        q, k, v = (torch.randn(2, 4, n, 32, generator=gen).to(dtype) for n in (L, 50, 50))
        ours = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        theirs = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out = et.scaled_dot_product_attention(*ours, is_causal=L > 1)
        ref = torch.nn.functional.scaled_dot_product_attention(*theirs, is_causal=L > 1)
        torch.testing.assert_close(out, ref, **tol)
        if grad:
            g = torch.randn(out.shape, generator=gen).to(dtype)
            out.backward(g)
            ref.backward(g)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a.grad, b.grad, **tol)
    assert validations() == 2  # one per value of the gradient flag


def test_a_cached_call_still_checks_its_values(validations):
    q, k, v = (torch.randn(1, 2, n, 16) for n in (3, 8, 8))
    et.scaled_dot_product_attention(q, k, v, scale=0.5)
    out = et.scaled_dot_product_attention(q, k, v, scale=0.25)  # the plan, another scale
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert validations() == 1
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="scale"):
            et.scaled_dot_product_attention(q, k, v, scale=bad)


def test_another_thread_count_makes_another_plan(validations):
    q, k, v = (torch.randn(1, 2, n, 16) for n in (3, 8, 8))
    threads = engine.get_num_threads()
    try:
        et.scaled_dot_product_attention(q, k, v)
        engine.set_num_threads(1)
        out = et.scaled_dot_product_attention(q, k, v)
    finally:
        engine.set_num_threads(threads)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert validations() == 2


def test_numpy_calls_keep_plans_of_their_own(validations):
    """A NumPy call and an ``engine.torch`` call of the same arrays: the NumPy result's lse in the
    inputs' dtype, the op's in float32 (16-bit)."""
    import ml_dtypes

    q, k, v = (torch.randn(1, 2, n, 32).to(torch.bfloat16) for n in (40, 64, 64))
    _, lse_t = et.scaled_dot_product_attention(q, k, v, return_lse=True)
    host = [t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) for t in (q, k, v)]
    for _ in range(2):
        _, lse_np = engine.scaled_dot_product_attention(*host, return_lse=True)
        _, lse_t2 = et.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert lse_t.dtype == lse_t2.dtype == torch.float32 and lse_np.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(lse_t.numpy(), lse_t2.numpy())


def test_mod_args_numbers_are_told_apart_by_their_bits(validations):
    """0.0 and -0.0 (equal, and hashed alike) are different arguments to a mod that reads the sign;
    each call gets its own value's result, as the NumPy API does (found by a trial: the second
    call took the first one's number)."""
    from engine import cast_like

    def signed(score, b, h, q_idx, kv_idx, x):
        return score + cast_like(math.copysign(1.0, x), score) * cast_like(kv_idx, score)

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, 8, generator=gen) for n in (2, 4, 4))
    for x in (-0.0, 0.0, np.float32(-0.0), np.float32(0.0), -0.0):
        out = et.scaled_dot_product_attention(q, k, v, score_mod=signed, mod_args=(x,))
        want = engine.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(), score_mod=signed, mod_args=(x,))
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=repr(x))
    nan = float("nan")
    before = len(calls._configs)
    for _ in range(3):
        et.scaled_dot_product_attention(q, k, v, score_mod=signed, mod_args=(nan,))
        et.scaled_dot_product_attention(q, k, v, score_mod=signed, mod_args=(float("nan"),))
    assert len(calls._configs) == before + 1  # one config for a NaN, not one per call
