"""Gradients of the float ``mod_args`` a score_mod reads (a learned bias), against torch float64
autograd of the same attention with the bias written as torch ops (a dense bias gathered from the
same table), on every backend that computes them, through the NumPy backward and ``engine.torch``.

Accuracy rule (FlashAttention's, as ``tests/backward/test_backward.py``): float64 within 1e-10; float32 no
further from the float64 truth than twice torch's own float32 autograd, plus 2 float32 ulps of the
gradient's size.
"""

import math

import numpy as np
import pytest
import torch

import engine
import engine.backends.cpu.tiles as cpu_tiles
import engine.problems.backward
import engine.torch as et
from engine.models.relative_bias import bucketed_relative_bias, relative_bias, relative_position_buckets
from variants.alibi import alibi_bias

from testmods import batch_key_bias, scale_and_shift

B, H, L, S, E = 2, 2, 37, 53, 8
BACKENDS = ["cpu", "reference"]


def _distance():
    return torch.arange(L)[:, None] - torch.arange(S)[None, :]


#: name -> (score_mod, mod_args(rng, dtype), marks, torch bias(scores, float tensors), is_causal)
CASES = {
    "head_distance_table": (
        relative_bias,
        lambda rng, dt: (0.5 * rng.standard_normal((H, L + S - 1)).astype(dt), S - 1),
        (True, False),
        lambda s, t: s + t[0][:, _distance() + S - 1],
        False,
    ),
    "slopes_times_distance": (
        alibi_bias,
        lambda rng, dt: ((0.3 + rng.random(H)).astype(dt),),
        (True,),
        lambda s, t: s - t[0][:, None, None] * _distance().abs().to(s.dtype),
        True,
    ),
    "bucket_map": (
        bucketed_relative_bias,
        lambda rng, dt: (
            rng.standard_normal((H, 8)).astype(dt),
            relative_position_buckets(L, S, num_buckets=8, max_distance=20, bidirectional=True),
            S - 1,
        ),
        (True, False, False),
        lambda s, t: s + t[0][:, torch.from_numpy(relative_position_buckets(L, S, 8, 20, True))[_distance() + S - 1]],
        False,
    ),
    "read_twice": (
        scale_and_shift,
        lambda rng, dt: ((np.array([[0.7, 0.2], [1.3, -0.4]]) + 0.1 * rng.standard_normal((H, 2))).astype(dt),),
        (True,),
        lambda s, t: s * t[0][:, 0, None, None] + t[0][:, 1, None, None],
        False,
    ),
    "batch_and_key": (
        batch_key_bias,
        lambda rng, dt: (rng.standard_normal((B, S)).astype(dt),),
        (True,),
        lambda s, t: s + t[0][:, None, None, :],
        False,
    ),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """cpu tiles far smaller than the inputs (tiling, causal skipping and several tasks run)."""
    monkeypatch.setattr(cpu_tiles, "CPU_BIG_BLOCK_Q", 8)
    monkeypatch.setattr(cpu_tiles, "CPU_BLOCK_K", 24)
    monkeypatch.setattr(cpu_tiles, "CPU_BWD_BLOCK_Q", 16)


def _problem(case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    mod, make, marks, torch_bias, causal = CASES[case]
    q, k, v = (rng.standard_normal((B, H, n, E)).astype(dtype) for n in (L, S, S))
    do = rng.standard_normal((B, H, L, E)).astype(dtype)
    return q, k, v, do, make(rng, dtype), dict(score_mod=mod, is_causal=causal), marks, torch_bias


def _torch_truth(case, q, k, v, do, mod_args, marks, torch_bias, causal, dtype):
    """torch autograd of the attention with the mod written in torch ops: (dq, dk, dv, dtables)."""
    t = lambda x: torch.tensor(np.asarray(x), dtype=dtype, requires_grad=True)  # noqa: E731
    leaves = [t(q), t(k), t(v)]
    tables = [t(a) for a, m in zip(mod_args, marks) if m]
    s = leaves[0] @ leaves[1].transpose(-1, -2) / math.sqrt(E)
    s = torch_bias(s, tables)
    if causal:
        s = s.masked_fill(_distance() < 0, -math.inf)
    out = torch.softmax(s, -1) @ leaves[2]
    out.backward(torch.tensor(do, dtype=dtype))
    return [x.grad.double().numpy() for x in leaves + tables]


def _check(got, truth, own, dtype, what):
    for name, g, ref, i in zip(("dq", "dk", "dv") + tuple(f"d{w}" for w in what), got, truth, range(len(truth))):
        err = float(np.max(np.abs(np.asarray(g, np.float64) - ref)))
        if dtype == np.float64:
            allowed = 1e-10
        else:
            torch_err = float(np.max(np.abs(own[i] - ref)))
            allowed = 2 * torch_err + 2 * 2.0**-24 * float(np.max(np.abs(ref)))
        assert err <= allowed, f"{name}: max error {err:.3g} > allowed {allowed:.3g}"


# every case in float64 (within 1e-10), two in float32 as well (two tables, one read twice): the
# kernels are the same code in either dtype, and each case and dtype is a new backward kernel of
# about ten seconds' compiling on the cpu backend
CASE_DTYPES = [(c, np.float64) for c in CASES] + [(c, np.float32) for c in ("head_distance_table", "read_twice")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("case", "dtype"), CASE_DTYPES, ids=[f"{c}-{d.__name__}" for c, d in CASE_DTYPES])
def test_numpy_backward_matches_torch_float64_autograd(case, backend, dtype, small_tiles):
    q, k, v, do, mod_args, kw, marks, torch_bias = _problem(case, dtype)
    out, lse = engine.scaled_dot_product_attention(q, k, v, mod_args=mod_args, return_lse=True, backend=backend, **kw)
    got = engine.scaled_dot_product_attention_backward(
        do, q, k, v, out, lse, mod_args=mod_args, backend=backend, return_mod_args_grad=marks, **kw
    )
    assert len(got) == 4 and len(got[3]) == len(mod_args)
    for g, a, m in zip(got[3], mod_args, marks):  # in the order of mod_args; None for the rest
        assert (g is None) == (not m)
        if m:
            assert g.shape == a.shape and g.dtype == a.dtype
    tables = [g for g in got[3] if g is not None]
    truth = _torch_truth(case, q, k, v, do, mod_args, marks, torch_bias, kw["is_causal"], torch.float64)
    own = _torch_truth(case, q, k, v, do, mod_args, marks, torch_bias, kw["is_causal"], torch.float32)
    _check(list(got[:3]) + tables, truth, own, dtype, ["table"] * len(tables))


@pytest.mark.parametrize("case", list(CASES))
def test_engine_torch_trains_the_mod_args_tensors(case):
    """Through ``engine.torch``: float tensors that require grad get their gradient; integer
    tensors and numbers beside them get none (float64, against torch autograd)."""
    q, k, v, do, mod_args, kw, marks, torch_bias = _problem(case, np.float64, seed=1)
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    targs = tuple(torch.tensor(a, requires_grad=m) if isinstance(a, np.ndarray) else a for a, m in zip(mod_args, marks))
    out = et.scaled_dot_product_attention(*leaves, mod_args=targs, **kw)
    out.backward(torch.from_numpy(do))
    got = [x.grad.numpy() for x in leaves] + [a.grad.numpy() for a, m in zip(targs, marks) if m]
    for a, m in zip(targs, marks):
        if isinstance(a, torch.Tensor) and not m:
            assert a.grad is None
    truth = _torch_truth(case, q, k, v, do, mod_args, marks, torch_bias, kw["is_causal"], torch.float64)
    _check(got, truth, None, np.float64, ["table"])


def test_engine_torch_gradcheck_of_a_table_and_a_mod_reading_it_twice():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    table = torch.randn(H, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    ss = torch.tensor([[0.8, 0.1], [1.2, -0.3]], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, table, ss):
        a = et.scaled_dot_product_attention(q, k, v, score_mod=relative_bias, mod_args=(table, 5), is_causal=True)
        return a + et.scaled_dot_product_attention(q, k, v, score_mod=scale_and_shift, mod_args=(ss,))

    assert torch.autograd.gradcheck(f, (q, k, v, table, ss), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cpu_gradients_are_the_same_bits_on_every_run_with_a_thread_count(small_tiles):
    # a float32 case the accuracy test compiles already (each new (mod, dtype) costs two kernels)
    q, k, v, do, mod_args, kw, marks, _ = _problem("head_distance_table", np.float32, seed=2)
    out, lse = engine.scaled_dot_product_attention(q, k, v, mod_args=mod_args, return_lse=True, **kw)
    for threads in sorted({1, engine.get_num_threads()}):
        engine.set_num_threads(threads)
        try:
            runs = [
                engine.scaled_dot_product_attention_backward(
                    do, q, k, v, out, lse, mod_args=mod_args, backend="cpu", return_mod_args_grad=marks, **kw
                )
                for _ in range(3)
            ]
        finally:
            engine.set_num_threads(None)
        for run in runs[1:]:
            for a, b in zip(runs[0][:3] + (runs[0][3][0],), run[:3] + (run[3][0],)):
                np.testing.assert_array_equal(a, b)  # bit for bit, the table included


def test_what_takes_a_gradient_and_what_is_returned():
    q, k, v, do, mod_args, kw, _, _ = _problem("bucket_map", np.float64)
    out, lse = engine.scaled_dot_product_attention(q, k, v, mod_args=mod_args, return_lse=True, **kw)
    bwd = engine.scaled_dot_product_attention_backward
    # True marks every float array: the table, not the bucket map nor the offset
    got = bwd(do, q, k, v, out, lse, mod_args=mod_args, return_mod_args_grad=True, backend="reference", **kw)
    assert got[3][0] is not None and got[3][1] is None and got[3][2] is None
    with pytest.raises(ValueError, match=r"mod_args\[1\] cannot take a gradient.*int64"):
        bwd(do, q, k, v, out, lse, mod_args=mod_args, return_mod_args_grad=(False, True, False), **kw)
    with pytest.raises(ValueError, match="return_mod_args_grad has 2 entries but mod_args has 3"):
        bwd(do, q, k, v, out, lse, mod_args=mod_args, return_mod_args_grad=(True, False), **kw)
    with pytest.raises(TypeError, match="return_mod_args_grad must be a bool or a tuple of bools"):
        bwd(do, q, k, v, out, lse, mod_args=mod_args, return_mod_args_grad="yes", **kw)
    # a mask_mod alone reads it: nothing depends on it differentiably, zeros
    window = lambda b, h, i, j, w: abs(i - j) <= w[0]  # noqa: E731
    w = np.array([5.0])
    o2, l2 = engine.scaled_dot_product_attention(
        q, k, v, mask_mod=window, mod_args=(w,), return_lse=True, backend="reference"
    )
    got = bwd(do, q, k, v, o2, l2, mask_mod=window, mod_args=(w,), return_mod_args_grad=True, backend="reference")
    np.testing.assert_array_equal(got[3][0], np.zeros(1))


def abs_of_slope(score, b, h, q_idx, kv_idx, slopes):
    return score - abs(slopes[h]) * (q_idx - kv_idx)


def compares_slope(score, b, h, q_idx, kv_idx, slopes):
    return score + (slopes[h] if slopes[h] > 0 else 0.0)


def slices_table(score, b, h, q_idx, kv_idx, table):
    return score + table[h, :2].sum()


def reads_too_much(score, b, h, q_idx, kv_idx, table):
    acc = score
    for t in range(table.shape[0]):
        acc += table[t]
    return acc


@pytest.mark.parametrize(
    "mod, args, match",
    [
        (abs_of_slope, (np.full(H, -0.5),), "wrong gradient with respect to mod_args\\[0\\]"),
        (compares_slope, (np.full(H, 0.5),), "cannot be differentiated with respect to mod_args\\[0\\]"),
        (slices_table, (np.ones((H, 4)),), "cannot be differentiated with respect to mod_args\\[0\\]"),
    ],
)
def test_mods_outside_the_limits_are_refused_by_name_before_any_kernel(mod, args, match):
    q, k, v, do, _, _, _, _ = _problem("head_distance_table", np.float64)
    # (the forward's outputs only feed the backward: the reference forward compiles no kernel)
    out, lse = engine.scaled_dot_product_attention(
        q, k, v, score_mod=mod, mod_args=args, return_lse=True, backend="reference"
    )
    with pytest.raises(TypeError, match=match) as info:
        engine.scaled_dot_product_attention_backward(
            do, q, k, v, out, lse, score_mod=mod, mod_args=args, return_mod_args_grad=True
        )
    assert mod.__name__ in str(info.value)


def test_too_many_reads_for_one_score_is_a_value_error():
    q, k, v, do, _, _, _, _ = _problem("head_distance_table", np.float64)
    table = np.full(200, 0.01)
    out, lse = engine.scaled_dot_product_attention(
        q, k, v, score_mod=reads_too_much, mod_args=(table,), return_lse=True, backend="reference"
    )
    with pytest.raises(ValueError, match="reads 200 elements of mod_args\\[0\\] for one score"):
        engine.scaled_dot_product_attention_backward(
            do, q, k, v, out, lse, score_mod=reads_too_much, mod_args=(table,), return_mod_args_grad=True
        )


def test_backends_without_mod_args_gradients_refuse_by_name():
    from engine.backends.cuda.backward import CudaBackward

    q, k, v, do, mod_args, kw, marks, _ = _problem("head_distance_table", np.float64)
    out, lse = engine.scaled_dot_product_attention(q, k, v, mod_args=mod_args, return_lse=True, **kw)
    problem = engine.problems.backward.validate_backward_args(
        do, q, k, v, out, lse, None, False, None, False, kw["score_mod"], None, None, mod_args,
        return_mod_args_grad=marks,
    )  # fmt: skip
    reasons = CudaBackward(engine.get_backend("cuda")).not_supported_reasons(problem)
    assert "gradients of mod_args are not computed by this backend" in reasons
