"""``engine.torch.scaled_dot_product_attention`` with a causal mask object as ``attn_mask``: torch's
``causal_lower_right``/``causal_upper_left`` (a tensor subclass whose storage is a placeholder of
uninitialised memory, shaped (2, L, S) from its enum value) and the engine's own
``engine.causal_lower_right``. Both are mapped to the engine's causal kinds, forward and backward,
and equal torch's math path on the materialised mask. Any other tensor subclass whose data is not
in its own storage is refused by name.

Before, torch's object was read as float data (with 2 query heads it broadcast and the output was
wrong by 0.1-1.9, differently on every run; with 4 heads a mask of shape (2, 5, 37) was refused),
and the engine's object failed in ``np.asarray`` as an object array.
"""

import warnings

import numpy as np
import pytest

import engine
from engine.problems.attention import BackwardProblem
from engine.problems.causal import causal_upper_left as engine_upper_left

from conftest import available_backends

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right as torch_lower_right  # noqa: E402
from torch.nn.attention.bias import causal_upper_left as torch_upper_left  # noqa: E402

import engine.torch as et  # noqa: E402

MASKS = {
    "torch lower right": (torch_lower_right, True),
    "torch upper left": (torch_upper_left, False),
    "engine lower right": (engine.causal_lower_right, True),
    "engine upper left": (engine_upper_left, False),
}
SHAPES = [(5, 37), (37, 5), (6, 6)]  # (L, S): fewer queries, more queries (rows that see nothing), square
BACKENDS = ["auto"] + [b for b in available_backends() if engine.get_backend(b).supports_backward]


def _make(factory, L, S):
    with warnings.catch_warnings():  # torch warns that lower right with L > S gives NaN (it gives zeros)
        warnings.simplefilter("ignore")
        return factory(L, S)


def _math_path(q, k, v, lower_right, L, S):
    """torch's math path on the materialised boolean mask: out and the gradients of sum(out * w)."""
    dense = torch.from_numpy(np.tri(L, S, k=S - L if lower_right else 0, dtype=bool))
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=dense)
    return out, leaves


def _backward_runs_offset(backend: str) -> bool:
    if backend == "auto":
        return True  # auto picks a backend whose backward can run it
    return bool(engine.get_backend(backend).op(BackwardProblem).supports_causal_offset)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("mask", list(MASKS))
def test_equals_torchs_math_path_forward_and_backward(mask, L, S, heads, backend):
    factory, lower_right = MASKS[mask]
    gen = torch.Generator().manual_seed(L * 100 + S + heads)
    q, k, v = (torch.randn(2, heads, n, 8, dtype=torch.float64, generator=gen) for n in (L, S, S))
    w = torch.randn(2, heads, L, 8, dtype=torch.float64, generator=gen)
    expected, leaves = _math_path(q, k, v, lower_right, L, S)
    (expected * w).sum().backward()

    grad = L == S or not lower_right or _backward_runs_offset(backend)
    ins = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    outs = [et.scaled_dot_product_attention(*ins, attn_mask=_make(factory, L, S), backend=backend) for _ in range(2)]
    for out in outs:  # the same on every run: no uninitialised memory is read
        np.testing.assert_allclose(out.detach().numpy(), expected.detach().numpy(), rtol=0, atol=1e-13)
    if not grad:
        return
    (outs[0] * w).sum().backward()
    for name, t, ref in zip(("query", "key", "value"), ins, leaves):
        np.testing.assert_allclose(t.grad.numpy(), ref.grad.numpy(), rtol=0, atol=1e-13, err_msg=name)


def test_float32_bottom_right_backward_on_auto():
    """float32 as a user trains: auto runs the bottom-right offset forward where its backward can
    run too; the gradients agree with torch's math path to float32's accuracy."""
    L, S = 7, 19
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 16, generator=gen) for n in (L, S, S))
    expected, leaves = _math_path(q.double(), k.double(), v.double(), True, L, S)
    expected.sum().backward()
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = et.scaled_dot_product_attention(*ins, attn_mask=torch_lower_right(L, S))
    out.sum().backward()
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.detach().numpy(), expected.detach().numpy(), rtol=0, atol=2e-6)
    for t, ref in zip(ins, leaves):
        np.testing.assert_allclose(t.grad.numpy(), ref.grad.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("factory", [torch_lower_right, engine.causal_lower_right])
def test_causal_object_and_is_causal_together_is_an_error(factory):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        et.scaled_dot_product_attention(q, q, q, attn_mask=factory(4, 4), is_causal=True)


def test_causal_object_for_other_sizes_is_an_error():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 37, 8)
    with pytest.raises(ValueError, match=r"\(L, S\) = \(5, 36\).*\(L, S\) = \(5, 37\)"):
        et.scaled_dot_product_attention(q, k, k, attn_mask=torch_lower_right(5, 36))


class _Wrapper(torch.Tensor):
    """A minimal wrapper subclass (as DTensor or a fake tensor): its values live in ``inner``, its
    own storage is not data."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return _Wrapper(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.inner if isinstance(x, _Wrapper) else x  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda x: _Wrapper(x) if isinstance(x, torch.Tensor) else x, out)


@pytest.mark.parametrize("argument", ["attn_mask", "query"])
def test_wrapper_subclass_refused_by_name(argument):
    q = torch.randn(1, 2, 4, 8)
    mask = torch.zeros(4, 4)
    args = {"query": q, "key": q, "value": q, "attn_mask": mask}
    args[argument] = _Wrapper(args[argument])
    with pytest.raises(TypeError, match=rf"{argument} is a .*_Wrapper, a tensor subclass whose data is not"):
        et.scaled_dot_product_attention(**args)


def test_subclass_with_real_data_is_read():
    """A subclass that keeps its values in its own storage (e.g. one that logs calls) is read."""

    class Logged(torch.Tensor):
        pass

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, generator=gen)
    mask = torch.randn(4, 4, dtype=torch.float64, generator=gen)
    out = et.scaled_dot_product_attention(q, q, q, attn_mask=mask.as_subclass(Logged))
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    np.testing.assert_allclose(out.detach().numpy(), expected.numpy(), rtol=0, atol=1e-13)


@pytest.mark.parametrize("argument", ["query", "key", "value"])
@pytest.mark.parametrize("api", ["engine.torch", "numpy"])
def test_causal_object_as_query_key_or_value_is_refused_by_name(argument, api):
    """A causal mask object in the wrong argument (its storage is a placeholder: it was read as the
    keys' values) is a TypeError naming the argument, in both APIs."""
    q = torch.randn(1, 2, 8, 8)
    args = {"query": q, "key": q, "value": q}
    args[argument] = torch_lower_right(8, 8)
    fn = et.scaled_dot_product_attention if api == "engine.torch" else engine.scaled_dot_product_attention
    with pytest.raises(TypeError, match=f"{argument} is a causal mask object .*pass it as attn_mask"):
        fn(**args)
