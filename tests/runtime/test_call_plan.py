"""Call plans (engine.plan): a call whose signature has a plan raises exactly the error the full
validation raises for the same arguments, leaves the caches as they were when it does, computes
with this call's values (not the first call's), and is rebuilt when the threads, the GEMM provider
selection or the plugins change. No timing here: the speed is bench/percall_vs_torch.py's."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import engine
from engine import plan as plans
from engine.runtime import gemm_providers as gp

RNG = np.random.default_rng(7)


def _arr(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def assert_same_error(good, bad, state=()):
    """``bad`` raises the same error (type and message) before any plan exists and after ``good``
    (the same signature) has stored one; the arrays in ``state`` are unchanged by either."""
    before = [a.copy() for a in state]
    plans.invalidate()
    full = _error(bad)
    for a, b in zip(state, before):
        np.testing.assert_array_equal(a, b)
    n = plans.plan_count()
    good()
    assert plans.plan_count() == n + 1, "the good call stored no plan: the test would not reach a cached call"
    before = [a.copy() for a in state]
    cached = _error(bad)
    assert type(cached) is type(full) and str(cached) == str(full)
    for a, b in zip(state, before):
        np.testing.assert_array_equal(a, b)
    return cached


# -- scaled_dot_product_attention: the values a plan does not fix ------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "bad",
    [
        {"scale": float("nan")},
        {"scale": float("inf")},
        {"scale": "0.5"},
        {"scale": True},
        {"dropout_p": 1.5},
        {"dropout_p": float("nan")},
        {"dropout_p": -0.1},
        {"dropout_p": "0.1"},
        {"dropout_seed": -1},
        {"dropout_seed": 2**64},
        {"dropout_seed": 1.5},
    ],
    ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r}",
)
def test_forward_value_errors_on_a_cached_call(backend, bad):
    q, k, v = _arr(1, 2, 5, 8), _arr(1, 2, 6, 8), _arr(1, 2, 6, 8)
    sdpa = engine.scaled_dot_product_attention
    assert_same_error(lambda: sdpa(q, k, v, backend=backend), lambda: sdpa(q, k, v, backend=backend, **bad))


def test_forward_block_mask_with_other_mod_args_on_a_cached_call():
    def mask(b, h, q_idx, kv_idx, n):
        return kv_idx <= q_idx + n[0]

    n = np.array([1])
    bm = engine.create_block_mask(mask, None, None, 8, 8, mod_args=(n,))
    q = _arr(1, 1, 8, 8)
    sdpa = engine.scaled_dot_product_attention
    err = assert_same_error(
        lambda: sdpa(q, q, q, block_mask=bm, mod_args=bm.mod_args, backend="cpu"),
        lambda: sdpa(q, q, q, block_mask=bm, mod_args=(n.copy(),), backend="cpu"),
    )
    assert "pass mod_args to create_block_mask" in str(err)


def test_forward_cached_calls_compute_with_their_own_values():
    """New array contents, a new scale, new mod_args values and dropout seeds: each call's own."""
    from variants.alibi import alibi_bias as alibi

    sdpa = engine.scaled_dot_product_attention
    for _ in range(3):
        q, k, v = _arr(2, 4, 9, 16), _arr(2, 4, 11, 16), _arr(2, 4, 11, 16)
        mask = RNG.random((9, 11)) > 0.3
        slopes = RNG.random(4).astype(np.float32)
        scale = float(RNG.random() + 0.1)
        got = sdpa(q, k, v, mask, scale=scale, score_mod=alibi, mod_args=(slopes,), backend="cpu")
        want = sdpa(q, k, v, mask, scale=scale, score_mod=alibi, mod_args=(slopes,), backend="reference")
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        seed = int(RNG.integers(2**40))
        a = sdpa(q, k, v, dropout_p=0.3, dropout_seed=seed, backend="cpu")
        b = sdpa(q, k, v, dropout_p=0.3, dropout_seed=seed, backend="reference")
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_forward_broadcast_and_strided_inputs_through_a_plan():
    """Broadcast batch/heads (zero-stride views rebuilt per call) and non-contiguous inputs."""
    sdpa = engine.scaled_dot_product_attention
    for _ in range(3):
        q = _arr(3, 4, 7, 8)
        k, v = _arr(1, 1, 5, 8), _arr(1, 1, 5, 8)
        np.testing.assert_allclose(
            sdpa(q, k, v, backend="cpu"), sdpa(q, k, v, backend="reference"), rtol=2e-5, atol=2e-5
        )
        qt = _arr(7, 4, 8).transpose(1, 0, 2)  # (4, 7, 8), not contiguous
        np.testing.assert_allclose(
            sdpa(qt, qt, qt, backend="cpu"), sdpa(qt, qt, qt, backend="reference"), rtol=2e-5, atol=2e-5
        )


def test_forward_plain_calls_through_a_plan():
    """The plain path (4-D inputs, no mask, mask_mod or dropout): each call's own arrays, scale
    and mod_args values, on the serial kernel (tiny) and the parallel one; inputs whose broadcast
    view is contiguous (a missing leading dim) still go through the rebuilt view."""
    from variants.alibi import alibi_bias as alibi

    sdpa = engine.scaled_dot_product_attention
    for shape in ((1, 2, 8, 16), (2, 4, 48, 32)):
        for _ in range(3):
            q, k, v = _arr(*shape), _arr(*shape), _arr(*shape)
            scale = float(RNG.random() + 0.1)
            slopes = RNG.random(shape[1]).astype(np.float32)
            for kw in ({}, {"scale": scale}, {"score_mod": alibi, "mod_args": (slopes,)}):
                got, lse = sdpa(q, k, v, backend="cpu", return_lse=True, **kw)
                want, want_lse = sdpa(q, k, v, backend="reference", return_lse=True, **kw)
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
                np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)
    q, kv = _arr(1, 1, 8, 16), _arr(1, 8, 16)
    for _ in range(3):
        kv[:] = _arr(1, 8, 16)
        np.testing.assert_allclose(sdpa(q, kv, kv, backend="cpu"), sdpa(q, kv, kv, backend="reference"), atol=2e-5)


def test_forward_signature_changes_take_their_own_plan():
    """A read-only input, another dtype, a bool flag given as an int: no plan of the first call's."""
    sdpa = engine.scaled_dot_product_attention
    q = _arr(1, 2, 4, 8)
    sdpa(q, q, q, backend="cpu")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sdpa(q, q, q, is_causal=1, backend="cpu")
    ro = q.copy()
    ro.flags.writeable = False
    np.testing.assert_allclose(sdpa(ro, ro, ro, backend="cpu"), sdpa(q, q, q, backend="cpu"))
    with pytest.raises(TypeError, match="share one dtype"):
        sdpa(q, q, q.astype(np.float64), backend="cpu")
    with pytest.raises(TypeError, match="mod_args must be a tuple"):
        sdpa(q, q, q, score_mod=lambda s, b, h, i, j: s, mod_args=[], backend="cpu")


# -- attention_with_kvcache ------------------------------------------------------------------


def _cache(B=2, H=2, S=16, D=8):
    return _arr(B, H, S, D), _arr(B, H, S, D), _arr(B, 2 * H, 1, D), _arr(B, H, 1, D), _arr(B, H, 1, D)


@pytest.mark.parametrize(
    "bad_seqlens, message",
    [
        (np.array([3, -1], np.int32), "cache_seqlens must be >= 0"),
        (np.array([3, 16], np.int32), "needs 17 slots"),
        (np.array([16, 2], np.int64), "needs 17 slots"),
        (-2, "cache_seqlens must be >= 0"),
        (16, "needs 17 slots"),
        # near int64's largest: the sum with the new keys wrapped negative, passed the capacity
        # test and the write went far outside the cache (a segmentation fault)
        (np.array([3, 2**63 - 1], np.int64), "needs 9223372036854775808 slots"),
        (2**63 - 1, "needs 9223372036854775808 slots"),
        (np.array([3, 2**64 - 1], np.uint64), "at most 9223372036854775807"),
        (2**63, "at most 9223372036854775807"),
    ],
)
def test_decode_seqlens_errors_on_a_cached_call(bad_seqlens, message):
    kc, vc, q, kn, vn = _cache()
    good_seqlens = np.array([3, 4], dtype=bad_seqlens.dtype) if isinstance(bad_seqlens, np.ndarray) else 3
    awk = engine.attention_with_kvcache
    err = assert_same_error(
        lambda: awk(q, kc, vc, kn, vn, cache_seqlens=good_seqlens, backend="cpu"),
        lambda: awk(q, kc, vc, kn, vn, cache_seqlens=bad_seqlens, backend="cpu"),
        state=(kc, vc),
    )
    assert message in str(err)


def test_decode_overlapping_caches_on_a_cached_call():
    """Two calls with one signature: separate caches, then k_cache and v_cache views of one buffer."""
    buf = _arr(2, 2, 2, 16, 8)
    _, _, q, kn, vn = _cache()
    awk = engine.attention_with_kvcache
    err = assert_same_error(
        lambda: awk(q, buf[0], buf[1], kn, vn, cache_seqlens=3, backend="cpu"),
        lambda: awk(q, buf[0], buf[0], kn, vn, cache_seqlens=3, backend="cpu"),
        state=(buf,),
    )
    assert "must not share memory" in str(err)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_decode_page_table_inside_a_cache_on_a_cached_call(backend):
    """A page table in k_cache's memory: the first sequence's key overwrote its page indices after
    validation, and the cpu write then went to page 1900671690 (a segmentation fault)."""
    kc, vc = np.zeros((8, 1, 4, 4), np.float32), np.ones((8, 1, 4, 4), np.float32)
    q, kn, vn = np.ones((2, 1, 1, 4), np.float32), np.full((2, 1, 1, 4), 1e30, np.float32), _arr(2, 1, 1, 4)
    seqlens = np.array([0, 1], np.int32)
    inside = np.ndarray((2, 3), np.int32, buffer=kc, offset=7 * 16 * 4)
    inside[...] = [[7, 5, 6], [0, 1, 2]]
    apart = inside.copy()
    awk = engine.attention_with_kvcache
    err = assert_same_error(
        lambda: awk(q, kc.copy(), vc.copy(), kn, vn, cache_seqlens=seqlens, page_table=apart, backend=backend),
        lambda: awk(q, kc, vc, kn, vn, cache_seqlens=seqlens, page_table=inside, backend=backend),
        state=(kc, vc),
    )
    assert "page_table must not share memory with k_cache or v_cache" in str(err)


def test_decode_scale_errors_on_a_cached_call():
    kc, vc, q, kn, vn = _cache()
    awk = engine.attention_with_kvcache
    for bad in (float("nan"), "1"):
        assert_same_error(
            lambda: awk(q, kc, vc, kn, vn, cache_seqlens=3, scale=0.3, backend="cpu"),
            lambda: awk(q, kc, vc, kn, vn, cache_seqlens=3, scale=bad, backend="cpu"),
            state=(kc, vc),
        )


@pytest.mark.parametrize(
    "bad_table, message",
    [
        (np.array([[0, 5], [1, 2]], np.int32), "is not a page of the cache"),
        (np.array([[0, -1], [1, 2]], np.int32), "is not a page of the cache"),
        (np.array([[0, 3], [1, 3]], np.int32), "would write the same cache slot"),
    ],
)
def test_decode_page_table_errors_on_a_cached_call(bad_table, message):
    pages_k, pages_v = _arr(5, 2, 4, 8), _arr(5, 2, 4, 8)
    q, kn, vn = _arr(2, 2, 1, 8), _arr(2, 2, 1, 8), _arr(2, 2, 1, 8)
    good_table = np.array([[0, 3], [1, 2]], np.int32)
    seqlens = np.array([4, 4], np.int32)  # the new key of each sequence goes to its second page
    awk = engine.attention_with_kvcache
    err = assert_same_error(
        lambda: awk(q, pages_k, pages_v, kn, vn, cache_seqlens=seqlens, page_table=good_table, backend="cpu"),
        lambda: awk(q, pages_k, pages_v, kn, vn, cache_seqlens=seqlens, page_table=bad_table, backend="cpu"),
        state=(pages_k, pages_v),
    )
    assert message in str(err)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_decode_cached_calls_write_and_attend_with_their_own_values(backend):
    """A generation loop: every step writes its token at its own position, with its own scale, and
    matches the reference on a fresh copy of the caches."""
    kc, vc = np.zeros((2, 2, 12, 8), np.float32), np.zeros((2, 2, 12, 8), np.float32)
    seqlens = np.array([0, 3], np.int32)
    for _ in range(6):
        q, kn, vn = _arr(2, 4, 1, 8), _arr(2, 2, 1, 8), _arr(2, 2, 1, 8)
        k_ref, v_ref = kc.copy(), vc.copy()
        scale = float(RNG.random() + 0.1)
        out = engine.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, scale=scale, backend=backend)
        want = engine.attention_with_kvcache(
            q, k_ref, v_ref, kn, vn, cache_seqlens=seqlens, scale=scale, backend="reference"
        )
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(kc, k_ref)
        np.testing.assert_array_equal(vc, v_ref)
        seqlens = seqlens + 1


def test_decode_a_kernel_failure_on_a_cached_call_restores_the_written_slots():
    """A score_mod that raises for some mod_args value: the value decides, so the second call runs
    on the plan and fails inside the kernel, after the write; the caches are as they were."""
    import numba

    @numba.njit
    def picky(score, b, h, q_idx, kv_idx, flag):
        if flag[0] > 0:
            raise ValueError("picky mod refused")
        return score

    kc, vc, q, kn, vn = _cache()
    awk = engine.attention_with_kvcache
    awk(q, kc, vc, kn, vn, cache_seqlens=3, score_mod=picky, mod_args=(np.array([0]),), backend="cpu")
    before = kc.copy(), vc.copy()
    with pytest.raises(ValueError, match="picky mod refused"):
        awk(q, kc, vc, kn, vn, cache_seqlens=5, score_mod=picky, mod_args=(np.array([1]),), backend="cpu")
    np.testing.assert_array_equal(kc, before[0])
    np.testing.assert_array_equal(vc, before[1])


def test_decode_plan_with_mods_calls_the_compiled_run_not_the_kernel_object(monkeypatch):
    """A kernel with mods calls its task by address (``TaskKernel``); the plan's later calls go to
    the run compiled for their types, not through ``TaskKernel.__call__``, which types the whole
    argument tuple again on every call (about 100 us of a 25 us decode step)."""
    from engine.kernels.task_pointer import TaskKernel

    def soft(score, b, h, q_idx, kv_idx, w):
        return score * w[0]

    kc, vc, q, kn, vn = _cache()
    awk = engine.attention_with_kvcache
    w = np.array([0.5], np.float32)
    plans.invalidate()
    for _ in range(2):  # the first call stores the plan, the second resolves the run
        awk(q, kc.copy(), vc.copy(), cache_seqlens=3, score_mod=soft, mod_args=(w,), backend="cpu")

    def typed_again(self, args, mod_args):
        raise AssertionError("the plan went through TaskKernel.__call__")

    monkeypatch.setattr(TaskKernel, "__call__", typed_again)
    for scale in (0.5, 2.0):  # the plan's calls with this call's values
        w[0] = scale
        got = awk(q, kc.copy(), vc.copy(), cache_seqlens=3, score_mod=soft, mod_args=(w,), backend="cpu")
        want = awk(q, kc.copy(), vc.copy(), cache_seqlens=3, score_mod=soft, mod_args=(w,), backend="reference")
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# -- invalidation and threads ------------------------------------------------------------------


def test_thread_count_and_gemm_selection_are_part_of_the_key(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two threads to tell thread counts apart")
    q = _arr(1, 1, 4, 4)
    engine.scaled_dot_product_attention(q, q, q, backend="cpu")
    key = plans.runtime_token()
    engine.set_num_threads(1)
    try:
        assert plans.runtime_token() != key
    finally:
        engine.set_num_threads(None)
    monkeypatch.setenv(gp.ENV_VAR, "numpy")
    assert plans.runtime_token() != key
    monkeypatch.setenv(gp.ENV_VAR, "no-such-provider")
    with pytest.raises(ValueError, match="ATTENTION_ENGINE_GEMM='no-such-provider'"):
        engine.scaled_dot_product_attention(q, q, q, backend="cpu")


def test_plugin_registration_clears_the_plans():
    q = _arr(1, 1, 4, 4)
    engine.scaled_dot_product_attention(q, q, q, backend="cpu")
    assert plans.plan_count() > 0

    class Plugin:
        pass

    name = engine.register_plugin(Plugin(), name="plan-test-plugin")
    try:
        assert plans.plan_count() == 0
    finally:
        engine.unregister_plugin(name)


def test_cached_calls_from_many_threads():
    """Threads calling with shared and private signatures at once get their own results."""
    shapes = [(1, 2, 5, 8), (2, 1, 7, 8), (1, 2, 5, 8)]
    inputs = [[(_arr(*s), _arr(*s), _arr(*s)) for _ in range(4)] for s in shapes]
    want = [[engine.scaled_dot_product_attention(*a, backend="reference") for a in per] for per in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                for a, w in zip(inputs[i], want[i]):
                    np.testing.assert_allclose(
                        engine.scaled_dot_product_attention(*a, backend="cpu"), w, rtol=2e-5, atol=2e-5
                    )
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_decode_read_only_cache_after_a_writable_one():
    """Writeability is part of the signature: the same shapes with a read-only cache get the full
    validation's refusal, and nothing is written."""
    kc, vc, q, kn, vn = _cache()
    awk = engine.attention_with_kvcache
    awk(q, kc, vc, kn, vn, cache_seqlens=3, backend="cpu")
    awk(q, kc, vc, kn, vn, cache_seqlens=4, backend="cpu")
    ro = kc.copy()
    ro.flags.writeable = False
    before = ro.copy(), vc.copy()
    with pytest.raises(ValueError, match="k_cache is read-only"):
        awk(q, ro, vc, kn, vn, cache_seqlens=5, backend="cpu")
    np.testing.assert_array_equal(ro, before[0])
    np.testing.assert_array_equal(vc, before[1])


def test_sinks_and_packed_queries_never_share_a_plan_with_plain_calls():
    """A plan has no sink step: calls with sinks (or packed queries) take the full path, so a
    signature's plan never answers them, and their calls never store one for plain calls. The
    oracle is the sink formula on a plain call's (out, lse), computed with return_lse=True (another
    signature)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 5, 16)).astype(np.float32)
    k = rng.standard_normal((1, 4, 7, 16)).astype(np.float32)
    v = rng.standard_normal((1, 4, 7, 16)).astype(np.float32)
    sinks = np.array([0.3, -2.0, 1.5, 4.0], np.float32)

    def with_sinks(out, lse):
        return out * np.exp(lse - np.logaddexp(lse, sinks[:, None]))[..., None]

    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True)
    want = {False: out, True: with_sinks(out, lse)}
    assert np.abs(want[True] - want[False]).max() > 0.1
    for first in (False, True):  # each order: a plan exists after the first call
        for s in (first, not first, first):
            got = engine.scaled_dot_product_attention(q, k, v, sinks=sinks if s else None)
            np.testing.assert_allclose(got, want[s], atol=1e-5, err_msg=f"sinks={s}")
        plans.invalidate()
    kc, vc = rng.standard_normal((2, 2, 2, 32, 16)).astype(np.float32)
    qd = rng.standard_normal((2, 4, 1, 16)).astype(np.float32)
    seqlens = np.array([3, 5], np.int32)
    out, lse = engine.attention_with_kvcache(qd, kc, vc, cache_seqlens=seqlens, return_lse=True)
    want = {False: out, True: with_sinks(out, lse)}
    for first in (False, True):
        for s in (first, not first, first):
            got = engine.attention_with_kvcache(qd, kc, vc, cache_seqlens=seqlens, sinks=sinks if s else None)
            np.testing.assert_allclose(got, want[s], atol=1e-5, err_msg=f"decode, sinks={s}")
        plans.invalidate()
