"""A gradient through the log-sum-exp: a loss that uses ``out`` and ``lse`` (merges of partial
attention, ring attention, z-losses), through the NumPy backward (``grad_lse=``) and
``engine.torch`` (``return_lse=True``), against torch float64 autograd of the same attention with
``torch.logsumexp`` of the same scores."""

import math

import numpy as np
import pytest
import torch

import engine
import engine.torch as et

from grad_cases import make_case

BACKENDS = ["cpu", "reference"]
CASES = ["plain", "float_mask", "causal_l_gt_s", "gqa", "bool_mask"]


def _torch_out_lse(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, scale=None):
    """Attention and its log-sum-exp in torch ops; rows with no visible key: out 0, lse -inf."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if enable_gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(E) if scale is None else scale)
    if is_causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril().logical_not(), -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    safe = s.masked_fill(dead, 0.0)
    out = (torch.softmax(safe, -1) @ v).masked_fill(dead, 0.0)
    lse = torch.logsumexp(safe, -1).masked_fill(dead[..., 0], -math.inf)
    return out, lse


def _truth(q, k, v, do, dlse, kw, dtype):
    t = lambda x: torch.tensor(np.asarray(x), dtype=dtype, requires_grad=True)  # noqa: E731
    leaves = [t(q), t(k), t(v)]
    tkw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None:
        tkw["attn_mask"] = torch.from_numpy(m) if m.dtype == bool else t(m)
        if m.dtype != bool:
            leaves.append(tkw["attn_mask"])
    out, lse = _torch_out_lse(*leaves[:3], **tkw)
    g_lse = torch.tensor(dlse, dtype=dtype).masked_fill(torch.isneginf(lse), 0.0)  # no key: lse is a constant
    loss = (out * torch.tensor(do, dtype=dtype)).sum() + (lse.masked_fill(torch.isneginf(lse), 0.0) * g_lse).sum()
    loss.backward()
    return [x.grad.double().numpy() for x in leaves]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_numpy_backward_with_grad_lse_matches_torch_autograd(case, backend, dtype):
    rng = np.random.default_rng(7)
    q, k, v, kw = make_case(rng, case, dtype)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kw)
    do = rng.standard_normal(out.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(dtype)
    float_mask = kw.get("attn_mask") is not None and kw["attn_mask"].dtype != bool
    got = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, backend=backend, grad_lse=dlse, return_mask_grad=float_mask, **kw
    )
    truth = _truth(q, k, v, do, dlse, kw, torch.float64)
    own = _truth(q, k, v, do, dlse, kw, torch.float32)
    for name, g, ref, mine in zip(("dq", "dk", "dv", "dmask"), got, truth, own):
        err = float(np.max(np.abs(g.astype(np.float64) - ref)))
        if dtype == np.float64:
            allowed = 1e-10
        else:
            allowed = 2 * float(np.max(np.abs(mine - ref))) + 2 * 2.0**-24 * float(np.max(np.abs(ref)))
        assert err <= allowed, f"{case} {name}: {err:.3g} > {allowed:.3g}"


def test_grad_lse_is_checked_and_refused_where_not_computed():
    rng = np.random.default_rng(0)
    q, k, v, kw = make_case(rng, "plain", np.float64)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True)
    do = np.ones_like(out)
    bwd = engine.scaled_dot_product_attention_backward
    with pytest.raises(ValueError, match=r"grad_lse must have shape \(2, 2, 37\)"):
        bwd(do, q, k, v, out, lse, grad_lse=np.ones((2, 2, 36)))
    with pytest.raises(TypeError, match="grad_lse must be at least as precise as query"):
        bwd(do, q, k, v, out, lse, grad_lse=np.ones(lse.shape, np.float32))
    from engine.backends.cuda.backward import CudaBackward
    from engine.problems.backward import validate_backward_args

    problem = validate_backward_args(do, q, k, v, out, lse, grad_lse=np.ones(lse.shape))
    reasons = CudaBackward(engine.get_backend("cuda")).not_supported_reasons(problem)
    assert "a gradient through lse is not computed by this backend" in reasons


def test_engine_torch_returns_lse_and_gradchecks_through_both_outputs():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 7, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    out, lse = et.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    ref_out, ref_lse = _torch_out_lse(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    assert lse.shape == (2, 2, 7) and lse.requires_grad

    def f(q, k, v, mask):
        out, lse = et.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
        return out, lse.square()  # a z-loss-like use of lse

    assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-6, atol=1e-7, rtol=1e-5)
    for causal in (True, False):  # only lse used, out ignored
        g = lambda q, k, v: et.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)[1]  # noqa: E731
        assert torch.autograd.gradcheck(g, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_merging_two_halves_of_the_keys_through_lse_trains_like_full_attention():
    """Ring/split attention: the halves' (out, lse) merged with torch ops give the full attention,
    and its gradients reach q, k and v through both outputs of each half."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    o1, l1 = et.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], return_lse=True)
    o2, l2 = et.scaled_dot_product_attention(q, k[:, :, 5:], v[:, :, 5:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(merged, full, atol=1e-12, rtol=0)
    g = torch.randn(full.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(merged, (q, k, v), g)
    want = torch.autograd.grad(full, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_lse_of_16_bit_inputs_is_float32():
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    out, lse = et.scaled_dot_product_attention(q, q, q, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want = torch.logsumexp(q.float() @ q.float().transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=0)
