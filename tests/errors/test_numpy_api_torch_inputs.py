"""torch tensors given to the NumPy API: CPU tensors are read in place and the results are NumPy
arrays; KV caches given as tensors are written in place; a tensor that requires grad is a
TypeError that points to ``engine.torch`` (before, torch's own "Use tensor.detach().numpy()"
surfaced, and detaching as it suggests would silently lose the gradient)."""

import numpy as np
import pytest

import engine

torch = pytest.importorskip("torch")


def _qkv(requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 4, 8, generator=gen, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_forward_with_a_tensor_that_requires_grad_points_to_engine_torch(which):
    q, k, v = _qkv()
    args = {"query": q, "key": k, "value": v}
    args[which] = args[which].clone().requires_grad_(True)
    with pytest.raises(TypeError, match=rf"{which} is a torch tensor that requires grad.*engine\.torch"):
        engine.scaled_dot_product_attention(**args)


def test_attn_mask_and_backward_arguments_that_require_grad_too():
    q, k, v = _qkv()
    mask = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"attn_mask is a torch tensor that requires grad.*\.detach\(\)"):
        engine.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True)
    grad_out = torch.ones(1, 2, 4, 8, requires_grad=True)
    with pytest.raises(TypeError, match=r"grad_out is a torch tensor that requires grad"):
        engine.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse)


def test_detached_tensors_give_numpy_results_equal_to_torch():
    q, k, v = _qkv(requires_grad=True)
    out = engine.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert type(out) is np.ndarray and out.dtype == np.float32
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


def test_engine_torch_keeps_the_gradient():
    import engine.torch as et

    q, k, v = _qkv(requires_grad=True)
    et.scaled_dot_product_attention(q, k, v).sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


def test_caches_given_as_tensors_are_written_in_place():
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.zeros(2, 1, 8, 4), torch.zeros(2, 1, 8, 4)
    q, k, v = (
        torch.randn(2, 2, 1, 4, generator=gen),
        torch.randn(2, 1, 1, 4, generator=gen),
        torch.randn(2, 1, 1, 4, generator=gen),
    )
    out = engine.attention_with_kvcache(q, k_cache, v_cache, key=k, value=v, cache_seqlens=np.array([0, 3], np.int32))
    assert type(out) is np.ndarray
    assert torch.equal(k_cache[0, :, 0], k[0, :, 0]) and torch.equal(v_cache[1, :, 3], v[1, :, 0])
    assert not k_cache[0, :, 1:].any() and not k_cache[1, :, :3].any() and not k_cache[1, :, 4:].any()
