"""Gradients of inputs that broadcast over batch or head axes come back in the inputs' own shapes,
summed over the axes they broadcast along (as torch's autograd gives them), on every backend with
a backward, through ``engine.scaled_dot_product_attention_backward`` and ``engine.torch``.

Before, the NumPy backward returned ``dk``/``dv`` (and ``dq`` when the query broadcast) in the
broadcast shape: (3, 2, 1, 7, 8) for a key of shape (1, 2, 1, 7, 8) serving a query of batch 3.
"""

import numpy as np
import pytest

import engine

from conftest import available_backends

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKWARD_BACKENDS = [b for b in available_backends() if engine.get_backend(b).supports_backward]

# name: (query, key, value shapes, enable_gqa, mask shape or None)
CASES = {
    "key/value batch 1 under a query batch 3": ((3, 2, 1, 5, 8), (1, 2, 1, 7, 8), (1, 2, 1, 7, 8), False, None),
    "2-D key/value under a 4-D query": ((2, 3, 5, 8), (7, 8), (7, 8), False, None),
    "query batch 1 under key/value batch 3": ((1, 2, 5, 8), (3, 2, 7, 8), (3, 2, 7, 6), False, None),
    "one query head under 4 key heads": ((2, 1, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8), False, None),
    "GQA with a broadcast key batch and a mask": ((3, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), True, (1, 1, 5, 7)),
    "fewer query dims than key dims": ((2, 5, 8), (3, 2, 7, 8), (3, 2, 7, 8), False, None),
}


def _inputs(case, seed=0):
    qs, ks, vs, gqa, ms = CASES[case]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in (qs, ks, vs))
    mask = None if ms is None else rng.standard_normal(ms)
    return q, k, v, gqa, mask


def _torch_grads(q, k, v, gqa, mask):
    """Gradients of sum(out * grad_out) by torch's math path in float64, grad_out all ones."""
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    # torch's SDPA wants the inputs at one rank: expand views are what its autograd sums back
    rank = max(a.ndim for a in (q, k, v))
    qe, ke, ve = (t.reshape((1,) * (rank - t.ndim) + tuple(t.shape)) for t in (qt, kt, vt))
    out = F.scaled_dot_product_attention(
        qe, ke, ve, attn_mask=None if mask is None else torch.tensor(mask), enable_gqa=gqa
    )
    out.backward(torch.ones_like(out))
    return out.detach().numpy(), [t.grad.numpy() for t in (qt, kt, vt)]


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backward_gradients_have_the_inputs_shapes(case, backend):
    q, k, v, gqa, mask = _inputs(case)
    out, lse = engine.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=gqa, return_lse=True, backend=backend
    )
    grads = engine.scaled_dot_product_attention_backward(
        np.ones_like(out), q, k, v, out, lse, attn_mask=mask, enable_gqa=gqa, backend=backend
    )
    expected_out, expected = _torch_grads(q, k, v, gqa, mask)
    np.testing.assert_allclose(out.reshape(expected_out.shape), expected_out, rtol=0, atol=1e-12)
    for name, g, x, e in zip(("dq", "dk", "dv"), grads, (q, k, v), expected):
        assert g.shape == x.shape, (name, g.shape, x.shape)
        assert g.dtype == x.dtype
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
def test_broadcast_gradients_are_deterministic(backend):
    q, k, v, gqa, mask = _inputs("GQA with a broadcast key batch and a mask")
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    out, lse = engine.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, return_lse=True, backend=backend)
    first, again = (
        engine.scaled_dot_product_attention_backward(
            np.ones_like(out), q, k, v, out, lse, enable_gqa=gqa, backend=backend
        )
        for _ in range(2)
    )
    for a, b in zip(first, again):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_empty_problem_gradients_have_the_inputs_shapes():
    """S = 0 answers without a backend: zeros, in the inputs' shapes too."""
    q, k, v = np.ones((3, 2, 5, 8)), np.ones((1, 2, 0, 8)), np.ones((1, 2, 0, 8))
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True)
    grads = engine.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v, out, lse)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert not any(g.any() for g in grads)


@pytest.mark.parametrize("backend", ["auto"] + BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_engine_torch_gradients_equal_torch(case, backend):
    """engine.torch gives torch's gradients: the engine's backward now returns them in the inputs'
    shapes itself, so torch's autograd has nothing left to sum."""
    import engine.torch as et

    q, k, v, gqa, mask = _inputs(case, seed=1)
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = et.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=None if mask is None else torch.tensor(mask), enable_gqa=gqa, backend=backend
    )
    out.backward(torch.ones_like(out))
    expected_out, expected = _torch_grads(q, k, v, gqa, mask)
    np.testing.assert_allclose(out.detach().numpy().reshape(expected_out.shape), expected_out, rtol=0, atol=1e-12)
    for name, t, e in zip(("dq", "dk", "dv"), (qt, kt, vt), expected):
        assert tuple(t.grad.shape) == tuple(t.shape)
        np.testing.assert_allclose(t.grad.numpy(), e, rtol=0, atol=1e-12, err_msg=name)
