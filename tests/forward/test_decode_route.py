"""``scaled_dot_product_attention`` calls shaped like a decode step run on the ``cpu`` decode op
(``engine.backends.cpu.decode_route``): the same results as the reference, on the first call and
through the call plan, in every dtype; the calls it must leave to the forward kernel."""

import ml_dtypes
import numpy as np
import pytest

import engine
from engine import plan
from engine.backends.cpu import decode_route

from tolerances import assert_out_close, lse_atol, out_atol

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def routed(monkeypatch):
    """How many calls the decode op answered since: through a runner (a plan's, or the one
    ``run_as_decode`` keeps per signature), or through a plan's plain path (each ``_check`` makes
    three calls)."""
    calls = []

    def spy(fn):
        return lambda *a: calls.append(1) or fn(*a)

    decode_route.forget_routes()
    monkeypatch.setattr(decode_route.DecodeRoute, "__call__", spy(decode_route.DecodeRoute.__call__))
    monkeypatch.setattr(decode_route.DecodeRoute, "_plain", spy(decode_route.DecodeRoute._plain))
    plan.invalidate()
    yield lambda: len(calls)
    plan.invalidate()
    decode_route.forget_routes()


def _arrays(rng, dtype, B, Hq, H, L, S, E=64, Ev=64):
    return (
        rng.standard_normal((B, Hq, L, E)).astype(dtype),
        rng.standard_normal((B, H, S, E)).astype(dtype),
        rng.standard_normal((B, H, S, Ev)).astype(dtype),
    )


def _check(q, k, v, **kw):
    for _ in range(3):  # the first call, the plan's first call, and its plain path
        out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert out.dtype == ref.dtype and lse.dtype == ref_lse.dtype and out.shape == ref.shape
    mask = kw.get("attn_mask") if isinstance(kw.get("attn_mask"), np.ndarray) else None
    assert_out_close(out, ref, out_atol(q.dtype, q, k, v, None, mask), f"out {kw}")
    assert_out_close(lse, ref_lse, lse_atol(q.dtype, q, k, None, mask), f"lse {kw}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16, np.float16], ids=str)
@pytest.mark.parametrize(
    "B, Hq, H, L, S, E, Ev",
    [(1, 12, 12, 1, 300, 64, 64), (2, 8, 2, 1, 97, 128, 32), (1, 4, 4, 2, 64, 32, 80), (1, 2, 1, 1, 1, 16, 16)],
)
def test_decode_shaped_calls_run_on_the_decode_op(dtype, B, Hq, H, L, S, E, Ev, routed, rng):
    q, k, v = _arrays(rng, dtype, B, Hq, H, L, S, E, Ev)
    _check(q, k, v, enable_gqa=Hq != H)
    _check(q, k, v, enable_gqa=Hq != H, attn_mask=engine.causal_lower_right(L, S))  # causal bottom right
    _check(q, k, v, enable_gqa=Hq != H, scale=-0.3)
    assert routed() == 9


def test_other_layouts_and_values(routed, rng):
    q, k, v = _arrays(rng, np.float32, 2, 4, 4, 1, 50, 32, 32)
    n = 0
    for args in (
        (q[0], k[0], v[0]),  # no batch
        (q[0, 0], k[0, 0], v[0, 0]),  # one head
        tuple(a.reshape((1,) + a.shape) for a in (q, k, v)),  # two batch dimensions
        (np.asfortranarray(q), k, v),  # a query in another layout (copied; the caches are not)
    ):
        _check(*args)
        n += 3
        assert routed() == n
    ro = [a.copy() for a in (q, k, v)]
    for a in ro:
        a.flags.writeable = False
    _check(*ro)
    v2 = v.copy()
    v2[0, 1, 7, 3], v2[1, 2, 9, 0] = np.nan, np.inf  # reach their rows' outputs only
    _check(q, k, v2)
    assert routed() == n + 6


def test_calls_the_decode_op_cannot_take_stay_on_the_forward_kernel(routed, rng):
    q, k, v = _arrays(rng, np.float32, 1, 4, 4, 1, 40)
    _check(q, k, v, is_causal=True)  # top left: the one row sees key 0 only
    _check(q, k, v, attn_mask=rng.random((1, 40)) > 0.5)
    _check(q, k[:, :, :40], v, dropout_p=0.0)
    q2, k2, v2 = _arrays(rng, np.float32, 2, 4, 4, 1, 40)
    _check(q2, k2[:1], v2[:1])  # k and v broadcast over the batch (zero strides): no copy for this
    q4, k4, v4 = _arrays(rng, np.float32, 1, 4, 4, 4, 40)
    _check(q4, k4, v4)  # float32, 4 rows: the forward kernel was as fast
    qs, ks, vs = _arrays(rng, np.float32, 1, 4, 4, 3, 2)
    _check(qs, ks, vs)  # L > S
    _check(q, k, k)  # k and v one array (caches may not share memory)
    assert routed() == 3  # only the dropout_p=0.0 call


def test_a_cached_call_still_checks_its_values(routed, rng):
    q, k, v = _arrays(rng, np.float32, 1, 4, 4, 1, 40)
    engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    with pytest.raises(ValueError, match="scale"):
        engine.scaled_dot_product_attention(q, k, v, backend="cpu", scale=float("nan"))
    with pytest.raises(ValueError, match="dropout"):
        engine.scaled_dot_product_attention(q, k, v, backend="cpu", dropout_p=1.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_torch_calls_and_their_gradients(dtype, routed):
    """``engine.torch`` asks for a float32 lse (a 16-bit one for its backward would be 3% off):
    the decode op computes it from a widened query; the gradients match torch's."""
    torch = pytest.importorskip("torch")
    from engine.torch import scaled_dot_product_attention as sdpa

    tdt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 8, 1, 64), (2, 4, 40, 64), (2, 4, 40, 64))
    ours = [torch.randn(s, generator=gen).to(tdt).requires_grad_() for s in shapes]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    out = sdpa(*ours, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*theirs, enable_gqa=True)
    grad = torch.randn(out.shape, generator=gen).to(tdt)
    out.backward(grad)
    ref.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, **tol)
    assert routed() == 1


def test_calls_without_a_plan_reuse_their_signatures_runner(routed, rng, monkeypatch):
    """A call that has no call plan (``engine.torch``'s tensors have none) keeps one runner per
    signature; another thread count makes another."""
    made = []
    real = decode_route.DecodeRoute.__init__
    monkeypatch.setattr(decode_route.DecodeRoute, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    q, k, v = _arrays(rng, np.float32, 1, 4, 4, 1, 40)
    mask = engine.causal_lower_right(1, 40)  # (a CausalBias: no call plan)
    for _ in range(3):
        _check(q, k, v, attn_mask=mask)
    assert len(made) == 1 and routed() == 9
    threads = engine.get_num_threads()
    try:
        engine.set_num_threads(1)
        _check(q, k, v, attn_mask=mask)
        assert len(made) == 2
    finally:
        engine.set_num_threads(threads)
