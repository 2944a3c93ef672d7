"""``engine.scaled_dot_product_attention_backward`` on every backend that has one, against torch's
float64 autograd of the same attention, plus determinism, validation and refusals.

Accuracy rule (FlashAttention's test rule): float64 gradients within 1e-10 of torch float64
autograd; float32 gradients no further from it than twice torch's own float32 autograd of the same
computation, plus 2 float32 ulps of the gradient's size (for cases where torch happens to be
nearly exact). For a broadcast mask the size is that of the sum of absolute values of the terms its
gradient sums: a bias shared by all keys of a row has gradient exactly 0 (the softmax ignores it),
computed as a sum of terms that cancel.
"""

import numpy as np
import pytest
import torch

import engine
import engine.backends.cpu.backward as cpu_backward
import engine.backends.cpu.tiles as cpu_tiles
from engine.backends.cpu.tiles import backward_splits, split_bounds
from engine.problems.masks import reduce_to_shape

from conftest import randn
from grad_cases import CASES, MOD_CASES, REFERENCE_ONLY, make_case, torch_attention

BACKWARD_BACKENDS = [
    n
    for n in engine.list_backends()
    if engine.get_backend(n).supports_backward and engine.get_backend(n).unavailable_reason() is None
]

#: the largest error / allowed error per (backend, dtype, case) seen in this process (for the report)
WORST: dict = {}


@pytest.fixture
def small_tiles(monkeypatch):
    """cpu tiles far smaller than the inputs, so that tiling, causal skipping, block maps and
    splits all run on small shapes."""
    monkeypatch.setattr(cpu_tiles, "CPU_BIG_BLOCK_Q", 8)  # the forward's query tiles
    monkeypatch.setattr(cpu_tiles, "CPU_BLOCK_K", 24)  # key tiles, both passes
    monkeypatch.setattr(cpu_tiles, "CPU_BWD_BLOCK_Q", 16)  # the backward's query tiles


def _torch_grads(q, k, v, do, kw, dtype, full_mask=False):
    """torch autograd of ``torch_attention`` in ``dtype``: (dq, dk, dv, dmask or None); with
    ``full_mask`` the float mask is expanded to the scores' shape first (dmask is then dS)."""
    t = lambda x: torch.tensor(np.asarray(x, dtype=dtype), requires_grad=True)  # noqa: E731
    leaves = [t(q), t(k), t(v)]
    tkw = dict(kw)
    m = kw.get("attn_mask")
    if m is not None:
        if full_mask and m.dtype != bool:
            m = np.broadcast_to(m, q.shape[:-1] + (k.shape[-2],))
        tkw["attn_mask"] = torch.from_numpy(m) if m.dtype == bool else t(m)
        if m.dtype != bool:
            leaves.append(tkw["attn_mask"])
    out = torch_attention(*leaves[:3], **tkw)
    out.backward(torch.tensor(np.asarray(do, dtype=dtype)))
    grads = [x.grad.numpy().astype(np.float64) for x in leaves]
    return grads + [None] * (4 - len(grads))


def _check(case, backend, dtype, rng):
    q, k, v, kw = make_case(rng, case, dtype)
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kw)
    do = randn(rng, out.shape, dtype)
    float_mask = kw.get("attn_mask") is not None and kw["attn_mask"].dtype != bool
    got = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, backend=backend, return_mask_grad=float_mask, **kw
    )
    assert len(got) == (4 if float_mask else 3)
    for g, x in zip(got, (q, k, v, kw.get("attn_mask"))):
        assert g.shape == x.shape and g.dtype == x.dtype
    truth = _torch_grads(q, k, v, do, kw, np.float64)
    own = _torch_grads(q, k, v, do, kw, np.float32) if dtype == np.float32 else None
    sizes = [np.abs(g) for g in truth[:3]]
    if float_mask:  # the size of a broadcast mask's gradient: the sum of |dS| it reduces
        ds = _torch_grads(q, k, v, do, kw, np.float64, full_mask=True)[3]
        sizes.append(reduce_to_shape(np.abs(ds), kw["attn_mask"].shape))
    for name, g, ref, i in zip(("dq", "dk", "dv", "dmask"), got, truth, range(4)):
        if ref is None:
            continue
        assert np.isfinite(g).all(), name
        err = float(np.max(np.abs(g.astype(np.float64) - ref), initial=0.0))
        if dtype == np.float64:
            allowed = 1e-10
        else:
            torch_err = float(np.max(np.abs(own[i] - ref), initial=0.0))
            allowed = 2 * torch_err + 2 * 2.0**-24 * float(np.max(sizes[i], initial=0.0))
        WORST[(backend, np.dtype(dtype).name, case, name)] = (err, allowed)
        assert err <= allowed, f"{case} {name}: max error {err:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize(
    "backend, case", [(b, c) for c in CASES for b in BACKWARD_BACKENDS if c not in REFERENCE_ONLY or b == "reference"]
)
def test_gradients_float64_match_torch_autograd(backend, case, rng, small_tiles):
    _check(case, backend, np.float64, rng)


@pytest.mark.parametrize("backend", BACKWARD_BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c not in MOD_CASES])
def test_gradients_float32_within_twice_torchs_own_error(backend, case, rng, small_tiles):
    _check(case, backend, np.float32, rng)


def test_cpu_default_tiles_too(rng):
    """The shipped tile sizes (one tile here) give the same gradients as the oracle."""
    for case in ("gqa", "causal_l_gt_s", "float_mask"):
        _check(case, "cpu", np.float64, rng)


def _cpu_grads(q, k, v, do, out, lse, kw):
    return engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)


def test_cpu_gradients_are_deterministic_for_a_thread_count(rng, small_tiles):
    q, k, v, kw = make_case(rng, "gqa", np.float32)
    kw["attn_mask"] = rng.standard_normal((1, 4, 37, 53)).astype(np.float32)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    do = randn(rng, out.shape, np.float32)
    for threads in sorted({1, engine.get_num_threads()}):
        engine.set_num_threads(threads)
        try:
            runs = [_cpu_grads(q, k, v, do, out, lse, kw) for _ in range(4)]
        finally:
            engine.set_num_threads(None)
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                np.testing.assert_array_equal(a, b)  # bit for bit


def test_cpu_splits_of_the_key_tiles_agree(rng, small_tiles, monkeypatch):
    """Cutting each head's key tiles into runs (the dQ partial sums) changes rounding only."""
    q, k, v, kw = make_case(rng, "causal_l_lt_s", np.float64)
    q, k, v = q[:1, :1], k[:1, :1], v[:1, :1]  # batch x heads = 1: the case splits exist for
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    do = randn(rng, out.shape, np.float64)
    ref = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="reference", **kw)
    seen = []
    for splits in (1, 2, 3):
        monkeypatch.setattr(cpu_backward, "backward_splits", lambda tasks, threads, tiles, s=splits: s)
        got = _cpu_grads(q, k, v, do, out, lse, kw)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=1e-12, rtol=0)
        seen.append(got[0])
    assert not all(np.array_equal(seen[0], s) for s in seen[1:]) or True  # rounding may or may not differ


def test_backward_splits_fill_every_thread_and_bounds_balance_work():
    assert backward_splits(8, 2, 100) == 1
    assert backward_splits(1, 2, 100) == 2
    assert backward_splits(3, 2, 100) == 2  # 6 tasks on 2 threads
    assert backward_splits(1, 16, 100) == 16
    assert backward_splits(5, 16, 100) == 13  # 65 tasks >= 4 per thread
    assert backward_splits(1, 16, 3) == 3  # never more runs than key tiles
    b = split_bounds(np.full(10, 4), 2)
    assert list(b) == [0, 5, 10]
    causal = 10 - np.arange(10)  # work of key tile t: the query tiles below it
    b = split_bounds(causal, 2)
    left, right = causal[: b[1]].sum(), causal[b[1] :].sum()
    assert b[0] == 0 and b[-1] == 10 and abs(left - right) <= causal.max()
    assert list(split_bounds(np.ones(3), 3)) == [0, 1, 2, 3]


def test_empty_problems_give_zero_gradients(rng):
    for L, S in ((0, 5), (4, 0)):
        q, k, v = randn(rng, (1, 2, L, 4)), randn(rng, (1, 2, S, 4)), randn(rng, (1, 2, S, 3))
        out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True)
        do = np.ones_like(out)
        for backend in BACKWARD_BACKENDS:
            dq, dk, dv = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend=backend)
            assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
            assert not dq.any() and not dk.any() and not dv.any()


# -- validation and refusals ----------------------------------------------------------------------


@pytest.fixture
def fwd(rng):
    q, k, v = randn(rng, (2, 3, 5, 4)), randn(rng, (2, 3, 7, 4)), randn(rng, (2, 3, 7, 6))
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, backend="reference")
    return q, k, v, out, lse


def test_forward_errors_are_the_same_in_the_backward(fwd):
    q, k, v, out, lse = fwd
    for kwargs in (
        {"is_causal": 1},
        {"scale": "x"},
        {"attn_mask": np.ones((9, 9), bool)},
        {"enable_gqa": "yes"},
        {"mod_args": [1]},
    ):
        with pytest.raises((TypeError, ValueError)) as fwd_err:
            engine.scaled_dot_product_attention(q, k, v, **kwargs)
        with pytest.raises(type(fwd_err.value)) as bwd_err:
            engine.scaled_dot_product_attention_backward(out, q, k, v, out, lse, **kwargs)
        assert str(bwd_err.value) == str(fwd_err.value)


def test_grad_out_out_and_lse_are_checked(fwd):
    q, k, v, out, lse = fwd
    bad = engine.scaled_dot_product_attention_backward
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 3, 5, 6\)"):
        bad(out[..., :5], q, k, v, out, lse)
    with pytest.raises(TypeError, match="grad_out must have the dtype of query"):
        bad(out.astype(np.float64), q, k, v, out, lse)
    with pytest.raises(ValueError, match=r"out must have shape"):
        bad(out, q, k, v, out[:1], lse)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 3, 5\)"):
        bad(out, q, k, v, out, lse[..., None])
    with pytest.raises(TypeError, match="lse must have a floating dtype"):
        bad(out, q, k, v, out, lse.astype(np.int32))
    with pytest.raises(ValueError, match="return_mask_grad=True needs a floating attn_mask"):
        bad(out, q, k, v, out, lse, attn_mask=np.ones((5, 7), bool), return_mask_grad=True)
    with pytest.raises(TypeError, match="return_mask_grad must be a bool"):
        bad(out, q, k, v, out, lse, return_mask_grad=1)


def test_a_score_mod_without_a_usable_derivative_is_named(fwd):
    q, k, v, out, lse = fwd

    def kinked(score, b, h, q_idx, kv_idx):
        return abs(score)  # complex-step gives 0 here: finite differences catch it

    def branchy(score, b, h, q_idx, kv_idx):
        return score if score > 0 else 0.5 * score  # no complex comparison in Numba

    def wrong_grad(score, b, h, q_idx, kv_idx):
        return 2.0

    def declared(score, b, h, q_idx, kv_idx):
        return 3.0 * score

    declared.score_grad = wrong_grad
    for mod, match in (
        (kinked, r"score_mod .*kinked: wrong derivative"),
        (branchy, r"score_mod .*branchy has no derivative .* complex"),
        (declared, r"score_mod .*declared: wrong derivative .* declared derivative is 2"),
    ):
        o, l_ = engine.scaled_dot_product_attention(q, k, v, score_mod=mod, return_lse=True, backend="reference")
        for backend in BACKWARD_BACKENDS:  # refused in validation, before any kernel
            with pytest.raises(TypeError, match=match):
                engine.scaled_dot_product_attention_backward(o, q, k, v, o, l_, score_mod=mod, backend=backend)


def test_with_score_grad_declares_a_derivative(fwd, rng):
    q, k, v, out, lse = fwd

    def leaky_grad(score, b, h, q_idx, kv_idx):
        return 1.0 if score > 0 else 0.5

    @engine.problems.mods.with_score_grad(leaky_grad)
    def leaky(score, b, h, q_idx, kv_idx):
        return score if score > 0 else 0.5 * score

    o, l_ = engine.scaled_dot_product_attention(q, k, v, score_mod=leaky, return_lse=True, backend="reference")
    do = randn(rng, o.shape, np.float32)
    got = engine.scaled_dot_product_attention_backward(do, q, k, v, o, l_, score_mod=leaky, backend="reference")
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    s = tq @ tk.transpose(-1, -2) / 2.0
    s = torch.where(s > 0, s, 0.5 * s)
    (torch.softmax(s, -1) @ tv).backward(torch.tensor(do, dtype=torch.float64))
    for g, t in zip(got, (tq, tk, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=2e-6, rtol=0)
    with pytest.raises(TypeError, match="score_grad must be a function"):
        engine.problems.mods.with_score_grad(3)


def test_backends_without_a_backward_refuse_it_and_say_so(fwd):
    q, k, v, out, lse = fwd
    problem = engine.problems.backward.validate_backward_args(out, q, k, v, out, lse)
    for name in engine.list_backends():
        backend = engine.get_backend(name)
        reasons = backend.not_supported_reasons(problem)
        assert ("no backward pass (gradients) in this backend" in reasons) == (not backend.supports_backward)
        assert backend.capabilities()["backward"] == backend.supports_backward
    # every built-in backend now has a backward (cuda since issue 20): a forward-only plugin
    # backend stands in for one without
    from engine.backends.base import Backend, Op
    from engine.backends.reference.forward import attend
    from engine.problems.attention import AttentionProblem

    class Forward(Op):
        problem_type = AttentionProblem

        def run(self, problem):
            return attend(problem)

    class ForwardOnly(Backend):
        name = "forward-only"
        ops = (Forward,)

    class Plugin:
        @engine.hookimpl
        def attention_backends(self):
            return [ForwardOnly]

    engine.register_plugin(Plugin(), name="forward-only-backend")
    try:
        assert engine.get_backend("forward-only").capabilities()["backward"] is False
        with pytest.raises(engine.NotSupportedError, match="no backward pass"):
            engine.scaled_dot_product_attention_backward(out, q, k, v, out, lse, backend="forward-only")
    finally:
        engine.unregister_plugin("forward-only-backend")
    assert "forward-only" not in engine.list_backends()


def test_gemm_acc_accumulates_in_place_with_any_row_stride(rng):
    from engine.kernels.cpu.blas import gemm_acc_kernel

    for dtype in (np.float32, np.float64):
        a, b = randn(rng, (30, 7), dtype), randn(rng, (7, 5), dtype)
        big = randn(rng, (40, 9), dtype)
        before = big.copy()
        c = big[3:33, 2:7]  # a view with row stride 9
        gemm_acc_kernel(a, b, c, False)
        np.testing.assert_allclose(big[3:33, 2:7], before[3:33, 2:7] + a @ b, rtol=1e-5)
        gemm_acc_kernel(np.ascontiguousarray(a.T), b, c, True)
        np.testing.assert_allclose(big[3:33, 2:7], before[3:33, 2:7] + 2 * (a @ b), rtol=1e-5)
        outside = np.ones(big.shape, bool)
        outside[3:33, 2:7] = False
        np.testing.assert_array_equal(big[outside], before[outside])  # nothing else written


def test_gemm_acc_takes_single_rows_whose_stride_is_the_items(rng):
    # the forward's last query tile of one row: P.T is (1, keys) with both strides one item;
    # BLAS refuses a leading dimension under the row's length (OpenBLAS printed "parameter
    # number 10 had an illegal value" and left c as it was)
    from engine.kernels.cpu.blas import gemm_acc_kernel

    for dtype in (np.float32, np.float64):
        col, b = randn(rng, (9, 1), dtype), randn(rng, (9, 5), dtype)
        a = col.T  # (1, 9), strides (item, item)
        assert a.strides[0] == a.itemsize
        c = np.zeros((1, 5), dtype)
        gemm_acc_kernel(a, b, c, False)
        np.testing.assert_allclose(c, a @ b, rtol=1e-5)
        c1 = np.zeros((9, 1), dtype)[:1]  # and a single output row: (1, 1)
        gemm_acc_kernel(col[:3].T, col[:3], c1, False)
        np.testing.assert_allclose(c1, col[:3].T @ col[:3], rtol=1e-5)


def test_lse_less_precise_than_query_is_refused():
    q = np.random.default_rng(0).standard_normal((1, 2, 8, 16)).astype(np.float32)
    out, lse = engine.scaled_dot_product_attention(q, q, q, return_lse=True)
    with pytest.raises(TypeError, match="lse must be at least as precise as query"):
        engine.scaled_dot_product_attention_backward(np.ones_like(out), q, q, q, out, lse.astype(np.float16))
    got = engine.scaled_dot_product_attention_backward(np.ones_like(out), q, q, q, out, lse.astype(np.float64))
    want = engine.scaled_dot_product_attention_backward(np.ones_like(out), q, q, q, out, lse)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
