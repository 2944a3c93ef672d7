"""The ``cuda`` backend's backward pass and dropout against the ``reference`` oracle.

As ``test_cuda_forward.py``: these tests run where a CUDA target exists, under Numba's CUDA
simulator (the simulator run of ``test_simulator.py``) or on a real GPU, and skip in the ordinary
run without one. Shapes are tiny and tiles small (4 query rows, 8 keys), so several tiles, partial
tiles, causal tile skipping and block-map skipping run; the simulator runs each GPU thread as a
Python thread, so each case combines several features.

Why not ``tests/backward/test_backward.py`` for cuda too: that specification holds each backend to
twice torch's own float32 error on cases of 37 x 53, a bound set by the summation order of each
kernel (the cuda kernel meets it at 4 x 8 tiles and misses it by 8% on one case at 16 x 16, as the
cpu kernel does on one case on some CPUs), and each of its cases takes about a minute under the
simulator. Here the bound comes from the roundoff model below, against float64 gradients.

Tolerance model (gradients; the forward's is in ``tests/tolerances.py``): the oracle computes in
float64 from scratch; the kernels compute in float32 from the given ``out`` and ``lse`` (rounded to
the storage dtype) and round each gradient once. A weight is known to ``u * (1 + smax + log S)``
relative (``u`` the storage dtype's unit roundoff, ``smax`` the score bound of
``tolerances.score_bound``, the log from lse), so

    |g - ref| <= GRAD_UNITS * u * (1 + smax + log S) * max(1, size)

where ``size`` is the largest magnitude of that gradient in the oracle (for the float mask's
gradient, of the sum of |dS| it reduces). GRAD_UNITS = 4 holds the worst measured case (0.16 of the
bound, float32 dq) with a margin of 6x (the ratios are printed with ``-s``).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

import engine
from engine.backends.cuda import CudaBackend
from engine.backends.reference import ReferenceBackend
from engine.backends.reference.dense import gradients
from engine.problems.attention import validate_attention_args
from engine.problems.backward import validate_backward_args
from engine.problems.masks import reduce_to_shape

from simulator import SIMULATOR as SIM
from simulator import default_tiles
from testmods import window_mod
from tolerances import assert_out_close, score_bound

BF16 = np.dtype(ml_dtypes.bfloat16)
pytestmark = pytest.mark.simulator
GPU = not SIM and engine.get_backend("cuda").unavailable_reason() is None
HERE = SIM or GPU
needs_cuda = pytest.mark.skipif(not HERE, reason="no CUDA target here; run under the simulator by test_simulator.py")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a real CUDA GPU (torch CUDA tensors)")

SMALL = CudaBackend(block_q=4, block_k=8)
UNIT = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}
GRAD_UNITS = 4.0
WORST: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _print_worst_ratios():
    """After the module: the largest error / tolerance ratio per gradient and dtype (``-s``)."""
    yield
    for key, ratio in sorted(WORST.items()):
        print(f"worst {key}: {ratio:.3f}")


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _backward(q, k, v, backend=SMALL, seed=0, **kw):
    """cuda forward, then cuda backward of it, checked against the float64 oracle on the same
    inputs. Returns (problem, gradients)."""
    rng = np.random.default_rng(seed)
    want_dm = kw.pop("return_mask_grad", False)
    pf = validate_attention_args(q, k, v, return_lse=True, **kw)
    assert not backend.not_supported_reasons(pf)
    out, lse = backend.run(pf)
    do = rng.standard_normal(np.shape(out)).astype(np.asarray(q).dtype)
    pb = validate_backward_args(do, q, k, v, out, lse, return_mask_grad=want_dm, **kw)
    assert not backend.not_supported_reasons(pb), backend.not_supported_reasons(pb)
    got = backend.run(pb)
    _check(pb, got)
    return pb, got


def _check(pb, got):
    dt = pb.dtype
    oracle = dataclasses.replace(pb)
    if pb.mask_kind == "float" and pb.attn_mask is not None:
        # host float masks reach the kernel cast to the storage dtype: the oracle gets the same values
        oracle = dataclasses.replace(pb, attn_mask=np.asarray(pb.attn_mask).astype(dt))
    ref = gradients(oracle)
    q, k = (np.nan_to_num(_f64(a)) for a in (pb.query, pb.key))
    mask = None if oracle.attn_mask is None else _f64(oracle.attn_mask)
    units = GRAD_UNITS * UNIT[np.dtype(dt)] * (1 + score_bound(q, k, pb.scale, mask) + math.log(max(pb.S, 2)))
    arrays = (pb.query, pb.key, pb.value, pb.attn_mask)
    for name, g, r, x in zip(("dq", "dk", "dv", "dmask"), got, ref, arrays):
        if r is None:
            assert g is None
            continue
        assert g.shape == np.shape(x) and g.dtype == np.asarray(x).dtype, (name, g.shape, g.dtype)
        size = np.abs(np.nan_to_num(_f64(r), posinf=0, neginf=0)).max(initial=0)
        if name == "dmask":  # the size of what the broadcast mask's gradient sums
            full = np.broadcast_to(_f64(oracle.attn_mask), pb.out_shape[:-1] + (pb.S,))
            ds = gradients(dataclasses.replace(oracle, attn_mask=full))[3]
            size = reduce_to_shape(np.abs(np.nan_to_num(ds)), np.shape(x)).max(initial=0)
        atol = units * max(1.0, size)
        key = f"{name} {np.dtype(dt).name}"
        err = np.abs(np.nan_to_num(_f64(g) - _f64(r))).max(initial=0)
        WORST[key] = max(WORST.get(key, 0.0), err / atol)
        assert_out_close(_f64(g), _f64(r), atol, f"cuda {name}")


def _qkv(rng, qshape, kshape, Ev, dtype=np.float32):
    q = rng.standard_normal(qshape).astype(dtype)
    k = rng.standard_normal(kshape).astype(dtype)
    v = rng.standard_normal(kshape[:-1] + (Ev,)).astype(dtype)
    return q, k, v


# ---- float32: every feature, several per case -----------------------------------------------------


@needs_cuda
def test_gqa_causal_partial_tiles_custom_scale(rng):
    # L = 9, S = 11: partial query and key tiles; causal skips key tiles right of the diagonal
    q, k, v = _qkv(rng, (1, 4, 9, 4), (1, 2, 11, 4), 3)
    _backward(q, k, v, enable_gqa=True, is_causal=True, scale=0.7)
    # two batch dimensions, L > S, no mask
    q, k, v = _qkv(rng, (2, 1, 1, 10, 4), (2, 1, 1, 6, 4), 5)
    _backward(q, k, v)


@needs_cuda
def test_boolean_mask_broadcast_fully_masked_rows_and_2d_inputs(rng):
    q, k, v = _qkv(rng, (2, 2, 6, 4), (2, 2, 11, 4), 3)
    mask = rng.random((6, 11)) > 0.4
    mask[2] = False  # row 2 of every head sees nothing: zero gradients
    pb, (dq, dk, dv, _) = _backward(q, k, v, attn_mask=mask)
    assert np.all(dq[:, :, 2] == 0)
    q, k, v = _qkv(rng, (5, 4), (9, 4), 4)  # 2-D: one head, no batch
    _backward(q, k, v, is_causal=True)


@needs_cuda
def test_float_mask_gradient_reduced_to_its_shape(rng):
    q, k, v = _qkv(rng, (2, 2, 6, 4), (2, 2, 13, 4), 3)
    pad = rng.standard_normal((2, 1, 1, 13)).astype(np.float32)  # a per-key bias, broadcast over heads and rows
    pad[1, ..., 9:] = -np.inf  # key padding of batch entry 1
    _, got = _backward(q, k, v, attn_mask=pad, return_mask_grad=True)
    assert got[3].shape == (2, 1, 1, 13) and np.all(got[3][1, ..., 9:] == 0)
    full = rng.standard_normal((2, 2, 6, 13)).astype(np.float32)
    full[0, 1, 3] = -np.inf  # a fully masked row
    _, got = _backward(q, k, v, attn_mask=full, return_mask_grad=True)
    assert np.all(got[3][0, 1, 3] == 0) and np.all(got[0][0, 1, 3] == 0)


@needs_cuda
def test_score_mod_complex_step_mask_mod_block_map_and_dropout(rng):
    from variants.alibi import alibi_bias, alibi_slopes

    q, k, v = _qkv(rng, (1, 2, 13, 4), (1, 2, 17, 4), 3)
    kinds = engine.create_block_mask(window_mod, None, None, 13, 17, mod_args=(3, 0), block_q=4, block_k=8).kinds
    assert (kinds == engine.problems.mods.EMPTY).any() and (kinds == engine.problems.mods.PARTIAL).any()
    # alibi declares no derivative: complex step (complex64) on the device
    _backward(
        q, k, v, score_mod=alibi_bias, mod_args=(alibi_slopes(2).astype(np.float32),), dropout_p=0.3, dropout_seed=11
    )
    _backward(q, k, v, mask_mod=window_mod, mod_args=(3, 0), dropout_p=0.25, dropout_seed=5)


@needs_cuda
def test_declared_score_grad_with_causal_and_gqa(rng):
    from variants.softcap import tanh_softcap

    q, k, v = _qkv(rng, (1, 2, 9, 4), (1, 1, 9, 4), 4)
    _backward(3 * q, k, v, score_mod=tanh_softcap, mod_args=(np.float32(1.5),), is_causal=True, enable_gqa=True)


@needs_cuda
def test_nan_propagates_as_in_the_oracle(rng):
    q, k, v = _qkv(rng, (1, 1, 6, 4), (1, 1, 9, 4), 3)
    q[0, 0, 4, 1] = np.nan
    _, (dq, dk, dv, _) = _backward(q, k, v)
    assert np.isnan(dq[0, 0, 4]).all() and np.isfinite(np.delete(dq[0, 0], 4, axis=0)).all()


# ---- 16-bit storage, float32 arithmetic -----------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_sixteen_bit(rng, dtype):
    q, k, v = _qkv(rng, (1, 4, 9, 4), (1, 2, 11, 4), 3, dtype)
    _backward(q, k, v, enable_gqa=True, is_causal=True)
    mask = rng.standard_normal((9, 11)).astype(dtype)
    mask[4] = -np.inf
    _, got = _backward(q, k, v, enable_gqa=True, attn_mask=mask, return_mask_grad=True, dropout_p=0.2, dropout_seed=3)
    assert got[3].dtype == np.dtype(dtype)


# ---- dropout: the same stream as the CPU ------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_drops_what_reference_drops(rng, causal):
    """The reference backend draws the keep mask from ``philox.keep_mask_numpy``, which
    ``tests/backward/test_dropout.py`` checks against the cpu kernels' stream."""
    q, k, v = _qkv(rng, (2, 2, 7, 4), (2, 2, 13, 4), 5)
    kw = dict(is_causal=causal, dropout_p=0.4, dropout_seed=2**40 + 123, return_lse=True)
    out, lse = SMALL.run(validate_attention_args(q, k, v, **kw))
    ref_out, ref_lse = ReferenceBackend().run(validate_attention_args(q, k, v, **kw))
    atol = 1e-5 * max(1.0, float(np.abs(v).max()))  # float32 rounding only: the same weights are dropped
    assert_out_close(out, ref_out, atol, "cuda dropout out")
    assert_out_close(lse, ref_lse, 1e-5, "cuda dropout lse")  # lse is that of the weights before dropout
    # a different seed drops other elements
    other, _ = SMALL.run(validate_attention_args(q, k, v, **dict(kw, dropout_seed=7)))
    assert np.abs(other - out).max() > 100 * atol
    # p = 1 drops everything
    ones = dict(kw, dropout_p=1.0)
    z, zl = SMALL.run(validate_attention_args(q, k, v, **ones))
    assert np.all(z == 0) and np.isfinite(zl).all()


# ---- determinism, public API, refusals ---------------------------------------------------------------


@needs_cuda
def test_gradients_are_bit_identical_run_to_run(rng):
    q, k, v = _qkv(rng, (1, 2, 9, 4), (1, 1, 10, 4), 3)
    mask = rng.standard_normal((1, 1, 9, 10)).astype(np.float32)
    kw = dict(attn_mask=mask, enable_gqa=True, dropout_p=0.3, dropout_seed=9, return_mask_grad=True)
    pb, first = _backward(q, k, v, **kw)
    again = SMALL.run(pb)
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()


@needs_cuda
def test_public_api_default_tiles_and_mask_gradient(rng):
    q, k, v = _qkv(rng, (1, 1, 5, 4), (1, 1, 7, 4), 3)
    mask = rng.standard_normal((5, 1)).astype(np.float32)  # one bias per row: its gradient is ~0
    with default_tiles():
        out, lse = engine.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda", return_lse=True)
        do = rng.standard_normal(out.shape).astype(np.float32)
        got = engine.scaled_dot_product_attention_backward(
            do, q, k, v, out, lse, attn_mask=mask, backend="cuda", return_mask_grad=True
        )
    pb = validate_backward_args(do, q, k, v, out, lse, attn_mask=mask, return_mask_grad=True)
    assert all(isinstance(g, np.ndarray) for g in got)
    _check(pb, got)


@needs_cuda
def test_engine_torch_autograd_on_the_cuda_backend_with_cpu_tensors(rng):
    """engine.torch's autograd Function with ``backend="cuda"`` on CPU tensors (the host-array
    path: copied to the device and back), against the same Function on ``reference``."""
    torch = pytest.importorskip("torch")
    import engine.torch as et

    def grads(backend):
        g = np.random.default_rng(3)
        leaves = [
            torch.tensor(g.standard_normal(s).astype(np.float32), requires_grad=True)
            for s in ((1, 2, 6, 4), (1, 1, 7, 4), (1, 1, 7, 3), (2, 1, 7))
        ]
        torch.manual_seed(4)  # the dropout seed is drawn from torch's generator
        out = et.scaled_dot_product_attention(
            *leaves[:3], attn_mask=leaves[3], enable_gqa=True, dropout_p=0.2, backend=backend
        )
        out.backward(torch.from_numpy(g.standard_normal(out.shape).astype(np.float32)))
        return out.detach().numpy(), [t.grad.numpy() for t in leaves]

    out, got = grads("cuda")
    ref_out, ref = grads("reference")
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    for g, r in zip(got, ref):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, atol=2e-5 * max(1.0, np.abs(r).max()), rtol=0)


def test_cuda_declares_backward_and_dropout_and_refuses_e_zero():
    cuda_backend = engine.get_backend("cuda")
    caps = cuda_backend.capabilities()
    assert caps["backward"] is True and caps["dropout"] is True
    q = np.ones((1, 1, 3, 0), dtype=np.float32)
    v = np.ones((1, 1, 4, 2), dtype=np.float32)
    k = np.ones((1, 1, 4, 0), dtype=np.float32)
    out = np.zeros((1, 1, 3, 2), dtype=np.float32)
    lse = np.zeros((1, 1, 3), dtype=np.float32)
    pb = validate_backward_args(out, q, k, v, out, lse, scale=1.0)
    assert "E = 0 has no backward pass in this backend" in cuda_backend.not_supported_reasons(pb)
    pf = validate_attention_args(q, k, v, scale=1.0)
    assert not any("E = 0" in r for r in cuda_backend.not_supported_reasons(pf))  # the forward takes it
    x = np.ones((1, 1, 3, 2))
    f64 = validate_backward_args(x, x, x, x, x, np.zeros((1, 1, 3)))
    assert any("float64" in r for r in cuda_backend.not_supported_reasons(f64))
    # device inputs are read as they are: one that broadcasts over the batch would need its gradient
    # reduced, which is refused by name (host inputs arrive as full-shape views; one key/value head
    # for all query heads is GQA with one group, whose gradient the kernel sums)
    from engine.backends.cuda.backward import backward_not_supported_reasons

    x = np.ones((2, 2, 3, 4), dtype=np.float32)
    pb = validate_backward_args(x, x, x[:1], x[:1], x, np.zeros((2, 2, 3), np.float32))
    assert pb.key.shape == (2, 2, 3, 4) and not backward_not_supported_reasons(pb)
    on_dev = dataclasses.replace(pb, on_device=True, key=x[:1])
    assert any("device key of shape (1, 2, 3, 4) broadcasts" in r for r in backward_not_supported_reasons(on_dev))
    assert not backward_not_supported_reasons(dataclasses.replace(pb, on_device=True))


# ---- real GPU only: engine.torch on torch CUDA tensors ---------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_engine_torch_autograd_on_cuda_tensors(dtype):
    """The autograd Function on torch CUDA tensors: forward and backward on the GPU (``cuda``
    backend), results torch CUDA tensors, gradients close to torch's own SDPA."""
    torch = pytest.importorskip("torch")
    import engine.torch as et

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 70, 4, 32, device="cuda", dtype=dt, generator=g)  # (B, L, H, E)
    q = x.transpose(1, 2).detach().requires_grad_()  # strided
    k = torch.randn(2, 2, 90, 32, device="cuda", dtype=dt, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 90, 16, device="cuda", dtype=dt, generator=g, requires_grad=True)
    mask = torch.randn(2, 1, 1, 90, device="cuda", dtype=dt, generator=g, requires_grad=True)
    out = et.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.is_cuda and out.dtype == dt
    do = torch.randn_like(out)
    out.backward(do)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, mask)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], enable_gqa=True)
    ref.backward(do.float())
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    for t, r in zip((q, k, v, mask), leaves):
        assert t.grad.is_cuda and t.grad.dtype == dt and t.grad.shape == t.shape
        assert (t.grad.float() - r.grad).abs().max().item() <= tol * max(1.0, r.grad.abs().max().item())


@needs_gpu
def test_engine_torch_cuda_dropout_and_side_stream():
    torch = pytest.importorskip("torch")
    import engine.torch as et

    q = torch.randn(1, 2, 64, 16, device="cuda", requires_grad=True)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.manual_seed(1)
        out = et.scaled_dot_product_attention(q, q, q, dropout_p=0.3, is_causal=True)
        out.sum().backward()
    torch.cuda.synchronize()
    assert q.grad.is_cuda and torch.isfinite(q.grad).all()
    torch.manual_seed(1)
    host = q.detach().cpu().requires_grad_()
    ref = et.scaled_dot_product_attention(host, host, host, dropout_p=0.3, is_causal=True)
    ref.sum().backward()  # the same seed drops the same elements on the cpu backend
    assert torch.allclose(out.detach().cpu(), ref.detach(), atol=1e-5)
    assert torch.allclose(q.grad.cpu(), host.grad, atol=1e-4)
