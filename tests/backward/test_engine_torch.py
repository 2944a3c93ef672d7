"""``engine.torch``: the autograd Function (gradcheck in float64 for every mask kind, causal, GQA,
E != Ev, L != S, fully masked rows, mods, dropout) and ``as_module`` for every registered variant."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import engine
import engine.torch as et
from engine.kernels.philox import keep_mask_numpy
from variants.alibi import alibi_bias, alibi_slopes
from variants.multi_head import MultiHeadAttention
from variants.sliding_window import window_mask
from variants.softcap import tanh_softcap

BACKWARD_BACKENDS = [
    n
    for n in engine.list_backends()
    if engine.get_backend(n).supports_backward and engine.get_backend(n).unavailable_reason() is None
]


def _leaf(gen, *shape):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()


def _gradcheck_case(case):
    """``(inputs, kwargs)``: float64 leaves (q, k, v and maybe a float mask) and keywords, tiny."""
    gen = torch.Generator().manual_seed(0)
    B, Hq, H, L, S, E, Ev = 1, 2, 2, 3, 5, 2, 3
    kw = {}
    if case == "gqa":
        Hq, H = 4, 2
        kw["enable_gqa"] = True
    if case == "e_ne_ev":
        E, Ev = 3, 2
    if case == "causal_l_gt_s":
        L, S = 5, 3
    q, k, v = _leaf(gen, B, Hq, L, E), _leaf(gen, B, H, S, E), _leaf(gen, B, H, S, Ev)
    inputs = [q, k, v]
    if case == "bool_mask_dead_row":
        m = torch.rand(B, 1, L, S, generator=gen) > 0.3
        m[0, 0, 1] = False  # a row with no visible key: zero output, zero gradient
        kw["attn_mask"] = m
    if case == "float_mask_grad":
        inputs.append(_leaf(gen, 1, Hq, 1, S))  # a per-key bias per head: its gradient is summed
    if case == "float_mask_dead_row":
        m = torch.randn(B, Hq, L, S, dtype=torch.float64, generator=gen)
        m[0, 1, 2] = -math.inf
        kw["attn_mask"] = m
    if case.startswith("causal"):
        kw["is_causal"] = True
    if case == "alibi":
        kw.update(is_causal=True, score_mod=alibi_bias, mod_args=(alibi_slopes(Hq),))
    if case == "softcap":
        kw.update(score_mod=tanh_softcap, mod_args=(1.5,), scale=2.0)
    if case == "mask_mod":
        kw.update(mask_mod=window_mask, mod_args=(1, 0))
    return inputs, kw


GRADCHECK_CASES = [
    "plain",
    "bool_mask_dead_row",
    "float_mask_grad",
    "float_mask_dead_row",
    "causal",
    "causal_l_gt_s",
    "gqa",
    "e_ne_ev",
    "alibi",
    "softcap",
    "mask_mod",
]


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case, backend):
    inputs, kw = _gradcheck_case(case)

    def f(q, k, v, m=None):
        return et.scaled_dot_product_attention(
            q, k, v, **({"attn_mask": m} if m is not None else {}), **kw, backend=backend
        )

    assert gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_with_dropout():
    """A fixed torch seed fixes the dropped weights, so the function is deterministic."""
    inputs, _ = _gradcheck_case("plain")

    def f(q, k, v):
        torch.manual_seed(11)
        return et.scaled_dot_product_attention(q, k, v, dropout_p=0.4)

    assert gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_seed_comes_from_torch_and_reaches_the_backward():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_leaf(gen, 2, 2, 6, 4) for _ in range(3))
    torch.manual_seed(5)
    out = et.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    again = et.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(out, again)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())  # what the call drew
    keep = torch.from_numpy(keep_mask_numpy(seed, 0.5, 2, 2, 6, 6))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = (torch.softmax(leaves[0] @ leaves[1].transpose(-1, -2) / 2, -1) * keep * 2) @ leaves[2]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    out.backward(g)
    ref.backward(g)
    for a, b in zip((q, k, v), leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


def test_matches_torch_sdpa_in_float32_and_needs_no_copies():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen, requires_grad=True) for _ in range(3))
    out = et.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    assert out.dtype == torch.float32 and out.requires_grad
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    with torch.no_grad():
        plain = et.scaled_dot_product_attention(q, k, v)
    assert not plain.requires_grad


def test_refusals():
    q = torch.randn(1, 1, 3, 2, requires_grad=True)
    slopes = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match=r"mod_args\[0\] requires grad but is 0-d"):
        et.scaled_dot_product_attention(q, q, q, score_mod=alibi_bias, mod_args=(slopes[0],))
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        et.scaled_dot_product_attention(q.detach().numpy(), q, q)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        et.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)
    # a detached tensor among mod_args is fine
    out = et.scaled_dot_product_attention(
        q, q, q, score_mod=alibi_bias, mod_args=(slopes.detach(),), backend="reference"
    )
    out.sum().backward()
    assert q.grad is not None


def test_import_engine_does_not_import_torch():
    code = (
        "import sys, numpy as np, engine\n"
        "q = np.ones((1, 1, 2, 2), np.float32)\n"
        "o, l = engine.scaled_dot_product_attention(q, q, q, return_lse=True, backend='reference')\n"
        "engine.scaled_dot_product_attention_backward(o, q, q, q, o, l, backend='reference')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- as_module ------------------------------------------------------------------------------------


def _torch_inputs(variant, rng):
    inputs = variant.example_inputs(2, 5, rng=rng)
    return {
        k: (torch.from_numpy(np.ascontiguousarray(v)).requires_grad_() if v.dtype.kind == "f" else v)
        for k, v in inputs.items()
    }


@pytest.mark.parametrize("name", engine.list_variants())
def test_as_module_every_variant_matches_and_gradchecks(name):
    """Output equal to the variant's own, and torch's gradcheck through the inputs and every
    parameter (the reference backend: no kernel to compile per variant)."""
    cls = engine.plugins.registry.variant_info()[0][name].cls
    variant = engine.get_variant(name, **cls.example_params(embed_dim=4, num_heads=2), dtype=np.float64, seed=0)
    module = et.as_module(variant)
    assert sorted(module.state_dict()) == sorted(variant.state_dict())
    inputs = _torch_inputs(variant, np.random.default_rng(0))
    expected, _ = variant(
        **{k: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
        backend="reference",
    )
    out, weights = module(**inputs, backend="reference")
    assert weights is None and isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-12, rtol=0)

    names = [n for n, _ in module.named_parameters()]
    tensors = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    others = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}

    def f(*args):
        params = dict(zip(names, args[: len(names)]))
        call = dict(zip(tensors, args[len(names) :]), **others)
        return functional_call(module, params, (), dict(call, backend="reference"))[0]

    args = tuple(p.detach().clone().requires_grad_() for p in module.parameters()) + tuple(inputs[k] for k in tensors)
    assert gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # and the output depends on every parameter of the module (not on copies of the variant's)
    f(*args).square().sum().backward()
    for n, a in zip(names, args):
        assert a.grad is not None and a.grad.abs().max() > 0, n


@pytest.mark.parametrize("name, params", [("multi-head", {}), ("cross", {"kdim": 6, "vdim": 10})])
def test_as_module_round_trips_with_multihead_attention_and_trains_alike(name, params):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, **params)
    module = et.as_module(engine.get_variant(name, embed_dim=16, num_heads=4, seed=3, **params))
    module.load_state_dict(mha.state_dict())
    mha.load_state_dict(module.state_dict())
    x = torch.randn(2, 7, 16, requires_grad=True)
    kv = torch.randn(2, 9, params.get("kdim", 16)), torch.randn(2, 9, params.get("vdim", 16))
    out, _ = module(x, *kv)
    ref, _ = mha(x, *kv, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    g = torch.randn(out.shape)
    grads = torch.autograd.grad(out, [x, *module.parameters()], g)
    refs = torch.autograd.grad(ref, [x, *(dict(mha.named_parameters())[n] for n, _ in module.named_parameters())], g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # trained values go back into a variant
    variant = engine.get_variant(name, embed_dim=16, num_heads=4, **params)
    variant.load_state_dict(module.state_dict())
    np.testing.assert_allclose(
        variant(x.detach().numpy(), *(t.numpy() for t in kv))[0], out.detach().numpy(), atol=1e-5, rtol=0
    )


def test_as_module_alibi_on_the_cpu_backend_sends_gradients_to_every_parameter():
    module = et.as_module(engine.get_variant("alibi", embed_dim=16, num_heads=4, seed=0, dtype=np.float64))
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    out, _ = module(x)
    out.square().sum().backward()
    for n, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    module.double()  # dtype follows the parameters
    assert module(x)[0].dtype == torch.float64
    module.float()
    assert module(x.float())[0].dtype == torch.float32


class NumpyOnly(MultiHeadAttention):
    name = "numpy-only-test"
    device_arrays = False


class Bypass(MultiHeadAttention):
    name = "bypass-test"

    def attention(self, query, key, value, **kwargs):  # attends without the hook's route
        return engine.scaled_dot_product_attention(
            query.detach().numpy(), key.detach().numpy(), value.detach().numpy(), **kwargs
        )

    def forward(self, *args, **kwargs):
        out, w = super().forward(*args, **kwargs)
        return out, w


def test_variants_that_cannot_be_wrapped_say_why():
    with pytest.raises(TypeError, match="computes in NumPy"):
        et.as_module(NumpyOnly(8, 2))
    module = et.as_module(Bypass(8, 2))
    object.__setattr__(module._variant, "attention", Bypass.attention.__get__(module._variant))  # undo the hook
    with pytest.raises(TypeError, match=r"did not attend through self.attention"):
        module(torch.randn(1, 3, 8))


@pytest.mark.parametrize("options", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_as_module_with_keys_merged_through_lse_trains_like_multihead_attention(options):
    """add_bias_kv/add_zero_attn merge their extra key through the log-sum-exp: its gradient
    reaches the bias and the inputs as torch.nn.MultiheadAttention's does (float64)."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64, **options)
    variant = engine.get_variant("multi-head", embed_dim=16, num_heads=2, seed=0, dtype=np.float64, **options)
    module = et.as_module(variant)
    module.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    out, _ = module(x)
    ref, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn(out.shape, dtype=torch.float64)
    names = [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(out, [x, *module.parameters()], g)
    refs = torch.autograd.grad(ref, [x, *(dict(mha.named_parameters())[n] for n in names)], g)
    for n, a, b in zip(["x"] + names, grads, refs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=n)


def test_create_graph_is_refused_not_silently_first_order():
    """A gradient penalty needs a second derivative; the node has none, so create_graph=True must
    raise instead of returning a gradient with no history (whose term the loss would drop)."""
    q = torch.rand(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    out = et.scaled_dot_product_attention(q, q.detach(), q.detach())
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(out.sum(), [q], create_graph=True)
