"""``engine.torch.scaled_dot_product_attention(..., sinks=)``: the sinks are one more input of the
custom operators and get their gradient. gradcheck in float64 (GQA, a fully masked row, a -inf
sink, a loss through lse), values and gradients against the float64 eager oracle (gpt-oss's
formula, ``eager_oracle``), torch.compile(fullgraph=True) and torch.export with one op per
direction, 16-bit inputs (lse stays float32), and the errors."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import engine
import engine.torch as et
from engine.problems.attention import BackwardProblem

from conftest import available_backends
from eager_oracle import eager

BACKENDS = [n for n in available_backends() if engine.get_backend(n).op(BackwardProblem) is not None]
LSE_GRAD = [b for b in BACKENDS if getattr(engine.get_backend(b).op(BackwardProblem), "supports_lse_grad", False)]


def _inputs(dtype=torch.float64, seed=0, L=4, S=5, last_sink=-float("inf")):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, L, 4, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, S, 4, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, S, 3, dtype=dtype, generator=gen, requires_grad=True)
    sinks = torch.tensor([0.3, -2.0, 1.5, last_sink], dtype=dtype).requires_grad_()
    mask = torch.rand(L, S, generator=gen) > 0.4
    mask[2] = False  # a row with no visible key: zeros, lse = sink
    return q, k, v, sinks, mask


@pytest.mark.parametrize("backend", LSE_GRAD)
def test_gradcheck_float64_through_out_and_lse(backend):
    q, k, v, sinks, mask = _inputs(last_sink=0.7)  # finite: the masked row's lse is its sink

    def f(q, k, v, sinks):
        return et.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks, return_lse=True, backend=backend
        )

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
    with torch.no_grad():
        sinks[3] = -float("inf")  # a head without a sink (its lse may be -inf: out only)
    causal = lambda q, k, v, s: et.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=mask, enable_gqa=True, sinks=s, backend=backend
    )
    assert torch.autograd.gradcheck(causal, (q, k, v, sinks))


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_the_eager_formula(backend):
    q, k, v, sinks, mask = _inputs()
    out, lse = et.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks, return_lse=True, backend=backend
    )
    want, want_lse = eager(q, k, v, mask.numpy(), 0.5, sinks)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(lse[:, :3, 2], sinks[:3].detach().expand(2, 3))  # -inf sink: -inf
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v, sinks), g)
    wanted = torch.autograd.grad(want, (q, k, v, sinks), g)
    for a, b in zip(got[:3], wanted[:3]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[3][:3], wanted[3][:3], atol=1e-12, rtol=0)
    assert got[3][3] == 0  # a head without a sink takes no gradient (the oracle's is nan: -inf - -inf)


def test_sinks_that_need_no_gradient_and_float32_against_the_oracle():
    q, k, v, sinks, mask = _inputs(torch.float32, seed=3)
    fixed = sinks.detach()
    out = et.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, sinks=fixed)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, _ = eager(q64, k64, v64, mask.numpy(), 0.5, fixed.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    for a, b in zip((dq, dk, dv), torch.autograd.grad(want.square().sum(), (q64, k64, v64))):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=0)


def _graphs_backend(forward, backward):
    def capture(into):
        def compiler(gm, example_inputs):
            into.append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=capture(forward), bw_compiler=capture(backward))


def test_compiled_fullgraph_equals_eager_with_one_op_each_way():
    q, k, v, sinks, mask = _inputs(seed=4)

    def loss(q, k, v, sinks):
        out, lse = et.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks, return_lse=True
        )
        return out.square().sum() + lse[torch.isfinite(lse)].square().sum()

    args = (q, k, v, sinks)
    want = torch.autograd.grad(loss(*args), args)
    fw, bw = [], []
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend=_graphs_backend(fw, bw))(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert len(fw) == 1 and len(bw) == 1
    assert [str(n.target) for n in bw[0].graph.nodes].count("attention_engine.attention_backward.default") == 1

    class Sinked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sinks = torch.nn.Parameter(sinks.detach()[:2].clone())

        def forward(self, q, k, v):
            return et.scaled_dot_product_attention(q, k, v, sinks=self.sinks)

    module = Sinked()
    x = q.detach()[:, :2], k.detach(), v.detach()
    ep = torch.export.export(module, x)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert ops == ["attention_engine.attention_forward.default"]
    torch.testing.assert_close(ep.module()(*x), module(*x), atol=0, rtol=0)


def test_sixteen_bit_inputs_keep_a_float32_lse_and_train_the_sinks():
    q, k, v, sinks, mask = _inputs(seed=5)
    half = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    s16 = sinks.detach()[:4].clone().nan_to_num(neginf=-1.0).to(torch.bfloat16).requires_grad_()
    out, lse = et.scaled_dot_product_attention(*half, attn_mask=mask, enable_gqa=True, sinks=s16, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want, want_lse = eager(*(t.detach().double() for t in half), mask.numpy(), 0.5, s16.detach().double())
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)  # not rounded to bfloat16
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=0)
    (ds,) = torch.autograd.grad(out.float().square().sum(), (s16,))
    s64 = s16.detach().double().requires_grad_()
    (want_ds,) = torch.autograd.grad(
        eager(*(t.detach().double() for t in half), mask.numpy(), 0.5, s64)[0].square().sum(), (s64,)
    )
    assert ds.dtype == torch.bfloat16
    torch.testing.assert_close(ds.double(), want_ds, atol=0.05 * float(want_ds.abs().max()), rtol=0)


def test_errors_name_the_sinks():
    q, k, v, sinks, _ = _inputs()
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\)"):
        et.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=sinks[:3])
    with pytest.raises(TypeError, match="sinks"):
        et.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="sinks"):
        et.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=torch.tensor([0.0, float("nan"), 0, 0]))
    with pytest.raises(ValueError, match=r"sinks must be on the query's device \(cpu\), got meta"):
        et.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=torch.zeros(4, device="meta"))
    # a list is taken as a tensor
    got = et.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=[0.1, 0.2, 0.3, 0.4])
    want = et.scaled_dot_product_attention(
        q, k, v, enable_gqa=True, sinks=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    )
    torch.testing.assert_close(got, want, atol=0, rtol=0)
