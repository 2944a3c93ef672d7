"""``engine.torch.varlen_attention``: packed sequences with autograd through the engine's varlen
backward (query, key, value, sinks; a loss through lse), gradcheck in float64 on every backend with
a varlen backward, values and gradients against the float64 eager oracle sequence by sequence,
torch.compile(fullgraph=True) with one op per direction, the NumPy backward's ``grad_lse`` against
autograd, and the refusals (CUDA tensors, mod_args that require grad)."""

import numpy as np
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import engine
import engine.torch as et
from engine.problems.varlen import VarlenBackwardProblem

from conftest import available_backends
from eager_oracle import eager_varlen
from testmods import head_bias

BACKENDS = [n for n in available_backends() if engine.get_backend(n).op(VarlenBackwardProblem) is not None]

# ragged and small (gradcheck perturbs every element): an empty sequence, more queries than keys
# (a row that sees no key when causal), one key
LENS_Q, LENS_K = [2, 0, 3, 2], [3, 2, 2, 1]


def _offsets(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def _inputs(dtype=torch.float64, seed=0, Hq=4, H=2):
    gen = torch.Generator().manual_seed(seed)
    cq, ck = _offsets(LENS_Q), _offsets(LENS_K)
    q = torch.randn(int(cq[-1]), Hq, 4, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(int(ck[-1]), H, 4, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(int(ck[-1]), H, 3, dtype=dtype, generator=gen, requires_grad=True)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=dtype).requires_grad_()
    return q, k, v, cq, ck, sinks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, window", [(True, None), (False, (2, 1))])
def test_gradcheck_float64(backend, causal, window):
    q, k, v, cq, ck, sinks = _inputs()

    def f(q, k, v, sinks):
        return et.varlen_attention(
            q, k, v, cq, ck, is_causal=causal, window=window, sinks=sinks, return_lse=True, backend=backend
        )

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
    plain = lambda q, k, v: et.varlen_attention(q, k, v, cq, ck, is_causal=causal, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(plain, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_the_eager_oracle(backend):
    q, k, v, cq, ck, sinks = _inputs(torch.float32, seed=1)
    out, lse = et.varlen_attention(q, k, v, cq, ck, is_causal=True, sinks=sinks, return_lse=True, backend=backend)
    assert out.shape == (q.shape[0], 4, 3) and lse.shape == q.shape[:2] and out.dtype == torch.float32
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    want, want_lse = eager_varlen(*leaves[:3], cq, ck, causal=True, sinks=leaves[3])
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v, sinks))
    wanted = torch.autograd.grad((want * g.double()).sum() + want_lse.sum(), leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, wanted):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, atol=5e-5 * max(1.0, float(b.abs().max())), rtol=0, msg=name)


def test_gqa_score_mod_with_a_tensor_argument_and_the_lse_only_loss():
    q, k, v, cq, ck, _ = _inputs(seed=3, Hq=4, H=1)
    slopes = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    out, lse = et.varlen_attention(  # the reference backend: no cpu kernel compiled for this mod
        q, k, v, cq, ck, is_causal=True, score_mod=head_bias, mod_args=(slopes,), return_lse=True, backend="reference"
    )
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def bias(b, L, S):
        i = (S - L + np.arange(L))[:, None]
        return -slopes.numpy()[:, None, None] * np.abs(i - np.arange(S)[None, :])

    want, want_lse = eager_varlen(*leaves, cq, ck, causal=True, bias_fn=bias)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    finite = torch.isfinite(want_lse)
    got = torch.autograd.grad(lse[finite].sum(), (q, k, v))  # grad_out is None: only lse reaches the loss
    wanted = torch.autograd.grad(want_lse[finite].sum(), leaves, allow_unused=True)
    for a, b, t in zip(got, wanted, leaves):  # lse does not depend on the values: dv = 0
        torch.testing.assert_close(a, torch.zeros_like(t) if b is None else b, atol=1e-12, rtol=0)


def _graphs_backend(forward, backward):
    def capture(into):
        def compiler(gm, example_inputs):
            into.append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=capture(forward), bw_compiler=capture(backward))


def test_compiled_fullgraph_equals_eager_with_one_op_each_way():
    q, k, v, cq, ck, sinks = _inputs(seed=4)

    def loss(q, k, v, sinks, cq, ck):
        out, lse = et.varlen_attention(q, k, v, cq, ck, is_causal=True, window=(3, 0), sinks=sinks, return_lse=True)
        return out.square().sum() + lse.square().sum()

    args = (q, k, v, sinks)
    want = torch.autograd.grad(loss(*args, cq, ck), args)
    fw, bw = [], []
    compiled = torch.compile(loss, fullgraph=True, backend=_graphs_backend(fw, bw))
    got = torch.autograd.grad(compiled(*args, cq, ck), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert len(fw) == 1 and len(bw) == 1
    assert [str(n.target) for n in fw[0].graph.nodes].count("attention_engine.varlen_forward.default") == 1
    assert [str(n.target) for n in bw[0].graph.nodes].count("attention_engine.varlen_backward.default") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_backward_grad_lse_matches_autograd(backend):
    """``engine.varlen_attention_backward(grad_lse=)``: d lse_i / d s_ij = P_ij, with the sinks."""
    q, k, v, cq, ck, sinks = _inputs(seed=5)
    arrays = [t.detach().numpy() for t in (q, k, v)]
    out, lse = engine.varlen_attention(
        *arrays, cq.numpy(), ck.numpy(), is_causal=True, sinks=sinks.detach().numpy(), return_lse=True
    )
    rng = np.random.default_rng(0)
    g, g_lse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    got = engine.varlen_attention_backward(
        g, *arrays, out, lse, cq.numpy(), ck.numpy(), is_causal=True, sinks=sinks.detach().numpy(),
        grad_lse=g_lse, return_sinks_grad=True, backend=backend,
    )  # fmt: skip
    want, want_lse = eager_varlen(q, k, v, cq, ck, causal=True, sinks=sinks)
    loss = (want * torch.tensor(g)).sum() + (want_lse * torch.tensor(g_lse)).sum()
    wanted = torch.autograd.grad(loss, (q, k, v, sinks))
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, wanted):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match=r"grad_lse must have shape \(7, 4\)"):
        engine.varlen_attention_backward(
            g, *arrays, out, lse, cq.numpy(), ck.numpy(), grad_lse=g_lse[:3], backend=backend
        )


def test_refusals_name_the_argument():
    q, k, v, cq, ck, sinks = _inputs()
    meta = torch.empty(q.shape, dtype=q.dtype, device="meta")
    with pytest.raises(engine.NotSupportedError, match="query is on meta.*cuda backend has no varlen op"):
        et.varlen_attention(meta, k, v, cq, ck)
    with pytest.raises(ValueError, match=r"mod_args\[0\] requires grad"):
        et.varlen_attention(q, k, v, cq, ck, score_mod=head_bias, mod_args=(torch.ones(4, requires_grad=True),))
    with pytest.raises(ValueError, match="cu_seqlens_q must end at"):
        et.varlen_attention(q, k, v, _offsets([2, 0, 3, 1]), ck)
    with pytest.raises(TypeError, match="key must be a torch.Tensor"):
        et.varlen_attention(q, k.detach().numpy(), v, cq, ck)
    with pytest.raises(ValueError, match="window left"):
        et.varlen_attention(q, k, v, cq, ck, window=(-3, 0))
    # offsets as lists work as tensors do
    torch.testing.assert_close(
        et.varlen_attention(q, k, v, cq.tolist(), ck.tolist(), sinks=sinks),
        et.varlen_attention(q, k, v, cq, ck, sinks=sinks),
        atol=0,
        rtol=0,
    )
