"""Attention sinks (``sinks=``) on ``scaled_dot_product_attention``, its backward and
``attention_with_kvcache``, against the float64 eager oracle (gpt-oss's formula: the sink as an
extra softmax column, dropped before the values): masks, GQA, dropout, fully masked rows, 2-D and
16-bit inputs, split-KV (the sink counted once), paged caches, windows; and the errors."""

import numpy as np
import pytest
import torch

import engine
from engine.problems.attention import BackwardProblem

from conftest import available_backends, randn
from eager_oracle import bottom_right, eager, leaf
from tolerances import assert_out_close, lse_atol, out_atol

BACKENDS = [n for n in available_backends() if engine.get_backend(n).op(BackwardProblem) is not None]
DECODERS = [n for n in available_backends() if engine.get_backend(n).supports_decode]


def _case(rng, shape_q=(2, 4, 5, 16), shape_kv=(2, 2, 7, 16), Ev=8, dtype=np.float32):
    q = randn(rng, shape_q, dtype)
    k = randn(rng, shape_kv, dtype)
    v = randn(rng, shape_kv[:-1] + (Ev,), dtype)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_match_the_eager_formula(rng, backend):
    q, k, v = _case(rng)
    sinks = np.array([0.3, -2.0, 1.5, 4.0], np.float32)
    mask = rng.random((5, 7)) > 0.4
    mask[2] = False  # a row with no visible key: zeros, lse = sink
    out, lse = engine.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True, sinks=sinks, return_lse=True, backend=backend
    )
    tq, tk, tv, ts = (leaf(x) for x in (q, k, v, sinks))
    want, want_lse = eager(tq, tk, tv, mask, 0.25, ts)
    assert_out_close(out, want.detach().numpy(), 4 * out_atol(np.float32, q, k, v, None), what="sinks out")
    assert_out_close(lse, want_lse.detach().numpy(), 4 * lse_atol(np.float32, q, k, None), what="sinks lse")
    np.testing.assert_array_equal(out[:, :, 2], 0.0)
    np.testing.assert_array_equal(lse[:, :, 2], np.broadcast_to(sinks[:, None], (2, 4, 1))[..., 0])
    g = randn(rng, out.shape)
    got = engine.scaled_dot_product_attention_backward(
        g, q, k, v, out, lse, attn_mask=mask, enable_gqa=True, sinks=sinks, return_sinks_grad=True, backend=backend
    )
    want.backward(torch.tensor(g, dtype=torch.float64))
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, (tq, tk, tv, ts)):
        assert a.shape == b.shape and a.dtype == np.float32, name
        np.testing.assert_allclose(a, b.grad.numpy(), atol=2e-5 * max(1.0, float(b.grad.abs().max())), err_msg=name)


@pytest.mark.parametrize(
    "backend", [b for b in BACKENDS if engine.get_backend(b).op(BackwardProblem).supports_lse_grad]
)
def test_a_loss_through_lse_reaches_the_sinks(rng, backend):
    """With ``grad_lse``, d lse'/d sink (the sink's weight) adds to dsinks: float64 against autograd
    of a loss that uses both outputs."""
    q, k, v = _case(rng, dtype=np.float64)
    sinks = np.array([0.3, -2.0, 1.5, 4.0])
    out, lse = engine.scaled_dot_product_attention(
        q, k, v, enable_gqa=True, sinks=sinks, return_lse=True, backend=backend
    )
    tq, tk, tv, ts = (leaf(x) for x in (q, k, v, sinks))
    want, want_lse = eager(tq, tk, tv, np.ones((5, 7), bool), 0.25, ts)
    g, gl = randn(rng, out.shape, np.float64), randn(rng, lse.shape, np.float64)
    ((want * torch.tensor(g)).sum() + (want_lse * torch.tensor(gl)).sum()).backward()
    got = engine.scaled_dot_product_attention_backward(
        g, q, k, v, out, lse, enable_gqa=True, sinks=sinks, grad_lse=gl, return_sinks_grad=True, backend=backend
    )
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, (tq, tk, tv, ts)):
        np.testing.assert_allclose(a, b.grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_float_mask_and_the_order_of_returned_gradients(rng, backend):
    """float64, causal; with a floating mask the gradients come as dq, dk, dv, dmask, dsinks."""
    q, k, v = _case(rng, (3, 6, 16), (3, 6, 16), dtype=np.float64)
    sinks = rng.standard_normal(3)
    for attn_mask, causal in ((None, True), (rng.standard_normal((6, 6)), False)):
        out, lse = engine.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, sinks=sinks, return_lse=True, backend=backend
        )
        tq, tk, tv, ts = (leaf(x) for x in (q, k, v, sinks))
        bias = None if attn_mask is None else attn_mask
        visible = np.tril(np.ones((6, 6), bool)) if causal else np.ones((6, 6), bool)
        want, want_lse = eager(tq, tk, tv, visible, 0.25, ts, bias)
        np.testing.assert_allclose(out, want.detach().numpy(), atol=1e-12)
        np.testing.assert_allclose(lse, want_lse.detach().numpy(), atol=1e-12)
        g = rng.standard_normal(out.shape)
        want.backward(torch.tensor(g))
        kw = dict(attn_mask=attn_mask, is_causal=causal, sinks=sinks, return_sinks_grad=True, backend=backend)
        if attn_mask is not None:
            kw["return_mask_grad"] = True
        got = engine.scaled_dot_product_attention_backward(g, q, k, v, out, lse, **kw)
        assert len(got) == (5 if attn_mask is not None else 4)
        np.testing.assert_allclose(got[-1], ts.grad.numpy(), atol=1e-10)
        for a, b in zip(got[:3], (tq, tk, tv)):
            np.testing.assert_allclose(a, b.grad.numpy(), atol=1e-10)


def test_dropout_with_sinks_backward_matches_the_reference(rng):
    q, k, v = _case(rng, (1, 2, 9, 16), (1, 2, 9, 16), dtype=np.float64)
    sinks = np.array([0.5, -0.5])
    kw = dict(dropout_p=0.3, dropout_seed=7, sinks=sinks)
    outs = {b: engine.scaled_dot_product_attention(q, k, v, **kw, return_lse=True, backend=b) for b in BACKENDS}
    g = rng.standard_normal(outs["reference"][0].shape)
    grads = {
        b: engine.scaled_dot_product_attention_backward(g, q, k, v, *outs[b], **kw, return_sinks_grad=True, backend=b)
        for b in BACKENDS
    }
    for b in BACKENDS:
        np.testing.assert_allclose(outs[b][0], outs["reference"][0], atol=1e-12)
        for a, w in zip(grads[b], grads["reference"]):
            np.testing.assert_allclose(a, w, atol=1e-10)


def test_two_dimensional_inputs_sixteen_bit_and_no_sink(rng):
    q, k, v = _case(rng, (5, 16), (7, 16))
    sink = np.array([0.7], np.float32)
    out, lse = engine.scaled_dot_product_attention(q, k, v, sinks=sink, return_lse=True)
    want, want_lse = eager(*(leaf(x[None]) for x in (q, k, v)), np.ones((5, 7), bool), 0.25, leaf(sink))
    np.testing.assert_allclose(out, want[0].detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(lse, want_lse[0].detach().numpy(), atol=1e-6)
    # a -inf sink is no sink
    plain = engine.scaled_dot_product_attention(q, k, v, return_lse=True)
    none = engine.scaled_dot_product_attention(q, k, v, sinks=np.array([-np.inf], np.float32), return_lse=True)
    np.testing.assert_allclose(none[0], plain[0], atol=1e-7)
    np.testing.assert_allclose(none[1], plain[1], atol=1e-7)
    # 16-bit: computed in float32 (the sink step too), rounded once
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    out16, lse16 = engine.scaled_dot_product_attention(q16, k16, v16, sinks=sink, return_lse=True, backend="cpu")
    assert out16.dtype == np.float16 and lse16.dtype == np.float16
    want16, want_lse16 = eager(*(leaf(x[None]) for x in (q16, k16, v16)), np.ones((5, 7), bool), 0.25, leaf(sink))
    np.testing.assert_allclose(out16, want16[0].detach().numpy(), atol=2 * 2.0**-11 * 2)
    np.testing.assert_allclose(lse16, want_lse16[0].detach().numpy(), rtol=2.0**-10)


def test_errors_are_raised_by_name(rng):
    q, k, v = _case(rng)
    for kw, exc, words in (
        (dict(sinks=np.zeros(2)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
        (dict(sinks=np.array([0, 0, np.inf, 0])), ValueError, r"sinks\[2\] = inf"),
        (dict(sinks="0"), TypeError, r"sinks must have a floating dtype"),
    ):
        with pytest.raises(exc, match=words):
            engine.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    out, lse = engine.scaled_dot_product_attention(q, k, v, enable_gqa=True, return_lse=True)
    with pytest.raises(ValueError, match=r"return_sinks_grad=True needs sinks="):
        engine.scaled_dot_product_attention_backward(out, q, k, v, out, lse, enable_gqa=True, return_sinks_grad=True)


def test_a_backward_op_that_does_not_declare_sinks_refuses_them():
    """The requirement is stated by the backward problem: an op without ``supports_sinks`` (a
    backward that recomputes the weights without the given lse, say) refuses them by name."""
    from engine.backends.base import Op
    from engine.problems.backward import validate_backward_args

    class Plain(Op):
        problem_type = BackwardProblem

    rng = np.random.default_rng(0)
    q, k, v = _case(rng)
    out, lse = engine.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=np.zeros(4), return_lse=True)
    problem = validate_backward_args(out, q, k, v, out, lse, enable_gqa=True, sinks=np.zeros(4))
    assert Plain(None).not_supported_reasons(problem) == ["sinks are not supported by this backend's backward"]
    without = validate_backward_args(out, q, k, v, out, lse, enable_gqa=True)
    assert Plain(None).not_supported_reasons(without) == []


# ---------------------------------------------------------------------------------------------
# decoding


def _cache_case(rng, B=3, Hq=4, Hkv=2, L=2, D=16, Dv=8, S_max=2000, seqlens=(1500, 3, 900)):
    return dict(
        query=randn(rng, (B, Hq, L, D)),
        k_cache=randn(rng, (B, Hkv, S_max, D)),
        v_cache=randn(rng, (B, Hkv, S_max, Dv)),
        key=randn(rng, (B, Hkv, L, D)),
        value=randn(rng, (B, Hkv, L, Dv)),
        cache_seqlens=np.asarray(seqlens, np.int32),
    )


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("window", [None, (100, 0)])
def test_kvcache_sinks_counted_once_with_split_kv(rng, backend, num_splits, window):
    case = _cache_case(rng)
    sinks = np.array([1.0, -0.5, 3.0, 0.0], np.float32)
    c = {n: (x.copy() if isinstance(x, np.ndarray) else x) for n, x in case.items()}
    out, lse = engine.attention_with_kvcache(
        **c, sinks=sinks, num_splits=num_splits, window=window, return_lse=True, backend=backend
    )
    for b in range(3):
        S = int(case["cache_seqlens"][b]) + 2
        q = leaf(case["query"][b])
        k, v = (leaf(c[n][b, :, :S]) for n in ("k_cache", "v_cache"))
        want, want_lse = eager(q, k, v, bottom_right(2, S, True, window or (-1, -1)), 0.25, leaf(sinks))
        qa, ka = case["query"][b], c["k_cache"][b, :, :S]
        assert_out_close(out[b], want.detach().numpy(), 4 * out_atol(np.float32, qa, ka, c["v_cache"][b], None))
        assert_out_close(lse[b], want_lse.detach().numpy(), 4 * lse_atol(np.float32, qa, ka, None))
