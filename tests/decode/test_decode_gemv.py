"""The cpu decode op's GEMV kernel (engine.kernels.cpu.decode_gemv): the common decode case
(contiguous cache of the compute dtype, no mods, at most DECODE_FUSED_ROWS rows per cache head)
against the reference backend and against the general kernel, on random shapes, windows, splits,
GQA groups and several new tokens; NaN values only where they are weighed."""

from __future__ import annotations

import numpy as np
import pytest

import engine
import engine.backends.cpu.decode as cpu_decode
from engine import plan
from engine.problems.decode import validate_decode_args


def _case(rng, dtype):
    B, Hkv = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    group = int(rng.choice([1, 2, 4]))
    L = int(rng.integers(1, 3))
    # widths the register-resident row passes take (16 to 128 by 16: decode_rows) and others
    D, Dv = int(rng.choice([8, 16, 64, 128])), int(rng.choice([8, 32, 80]))
    S_max = int(rng.integers(8, 600))
    q = rng.standard_normal((B, Hkv * group, L, D)).astype(dtype)
    kc = rng.standard_normal((B, Hkv, S_max, D)).astype(dtype)
    vc = rng.standard_normal((B, Hkv, S_max, Dv)).astype(dtype)
    kn = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
    vn = rng.standard_normal((B, Hkv, L, Dv)).astype(dtype)
    kw = dict(
        cache_seqlens=rng.integers(0, S_max - L + 1, B).astype(np.int32),
        window=None if rng.random() < 0.5 else (int(rng.integers(0, 40)), int(rng.choice([-1, 0, 3]))),
        is_causal=bool(rng.random() < 0.8),
        num_splits=None if rng.random() < 0.6 else int(rng.integers(1, 5)),
        return_lse=True,
    )
    return q, kc, vc, kn, vn, kw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemv_kernel_matches_reference_and_the_general_kernel(dtype, monkeypatch):
    rng = np.random.default_rng(2028)
    gemv_rule = cpu_decode.uses_gemv
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for _ in range(12):
        q, kc, vc, kn, vn, kw = _case(rng, dtype)
        plan.invalidate()
        assert gemv_rule(validate_decode_args(q, kc, vc, kn, vn, **kw))
        results = {}
        for name, backend, gemv in (("gemv", "cpu", True), ("general", "cpu", False), ("ref", "reference", True)):
            monkeypatch.setattr(cpu_decode, "uses_gemv", gemv_rule if gemv else (lambda p: False))
            for _ in range(2):  # the second call runs on the plan
                k, v = kc.copy(), vc.copy()
                results[name] = engine.attention_with_kvcache(q, k, v, kn, vn, backend=backend, **kw) + (k, v)
            plan.invalidate()
        for name in ("gemv", "general"):
            out, lse, k, v = results[name]
            np.testing.assert_allclose(out, results["ref"][0], rtol=tol, atol=tol)
            np.testing.assert_allclose(lse, results["ref"][1], rtol=tol, atol=tol)
            np.testing.assert_array_equal(k, results["ref"][2])
            np.testing.assert_array_equal(v, results["ref"][3])


@pytest.mark.parametrize("D", [8, 64])  # 64: decode_rows' passes for the one-row case
def test_gemv_kernel_nan_values_reach_only_the_rows_that_weigh_them(D):
    q = np.ones((1, 2, 1, D), np.float32)
    kc = np.zeros((1, 1, 16, D), np.float32)
    vc = np.zeros((1, 1, 16, D), np.float32)
    vc[0, 0, 10] = np.nan  # past cache_seqlens: never weighed
    out = engine.attention_with_kvcache(q, kc, vc, cache_seqlens=5, backend="cpu")
    assert np.isfinite(out).all()
    vc[0, 0, 2] = np.nan  # weighed by every row
    out = engine.attention_with_kvcache(q, kc, vc, cache_seqlens=5, backend="cpu")
    assert np.isnan(out).all()
    out = engine.attention_with_kvcache(q, kc, vc, cache_seqlens=5, window=(1, -1), backend="cpu")
    assert np.isfinite(out).all()  # the window hides key 2 from the row at position 4
    # two query rows (positions 6 and 7): key 7, in a group of four keys the first row weighs
    # but for it, reaches the second row only
    q2, vc[:] = np.ones((1, 1, 2, D), np.float32), 0
    vc[0, 0, 7] = np.nan
    out = engine.attention_with_kvcache(q2, kc, vc, cache_seqlens=8, backend="cpu")
    assert np.isfinite(out[0, 0, 0]).all() and np.isnan(out[0, 0, 1]).all()


@pytest.mark.parametrize("D", [8, 64])  # 64: decode_rows' value pass
def test_gemv_kernel_one_row_skips_unweighed_values_among_eight(D):
    # one row per cache head: value rows go eight per pass (or all in registers); a pass whose
    # weights include an exact 0 (key 2: its score underflows exp) must skip that row's NaN, one
    # that weighs it not
    q = np.ones((1, 1, 1, D), np.float32)
    kc = np.zeros((1, 1, 16, D), np.float32)
    vc = np.zeros((1, 1, 16, D), np.float32)
    kc[0, 0, 2], vc[0, 0, 2] = -100.0, np.nan
    out = engine.attention_with_kvcache(q, kc, vc, cache_seqlens=12, backend="cpu")
    assert np.isfinite(out).all()
    kc[0, 0, 2] = 0.0
    out = engine.attention_with_kvcache(q, kc, vc, cache_seqlens=12, backend="cpu")
    assert np.isnan(out).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_read_orders_of_one_row_match_the_reference(dtype, monkeypatch):
    # one query row per cache head (R = 1): the interleaved passes and the address-order ones
    # (GemvArgs.sequential, chosen per machine by autotune.tune_decode_order) give the same result
    rng = np.random.default_rng(7)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for case in range(6):
        B, H, D, S_max = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.choice([8, 64, 128])), 700
        q = rng.standard_normal((B, H, 1, D)).astype(dtype)
        kc = rng.standard_normal((B, H, S_max, D)).astype(dtype)
        vc = rng.standard_normal((B, H, S_max, D)).astype(dtype)
        if case == 4:  # a NaN value the window gives weight 0: skipped, so out stays finite
            vc[0, 0, 10] = np.nan
        kw = dict(
            cache_seqlens=rng.integers(300, 600, B).astype(np.int32),
            window=None if case % 2 else (100 if case == 4 else int(rng.integers(0, 300)), 0),
            num_splits=None if case < 3 else 2,
            return_lse=True,
        )
        want = engine.attention_with_kvcache(q, kc, vc, backend="reference", **kw)
        for sequential in (False, True):
            monkeypatch.setattr(cpu_decode, "tune_decode_order", lambda dt, s=sequential: s)
            plan.invalidate()
            for _ in range(2):  # the second call runs on the plan
                out, lse = engine.attention_with_kvcache(q, kc, vc, backend="cpu", **kw)
            assert np.isfinite(out).all()
            np.testing.assert_allclose(out, want[0], rtol=tol, atol=tol, err_msg=f"sequential={sequential}")
            np.testing.assert_allclose(lse, want[1], rtol=tol, atol=tol, err_msg=f"sequential={sequential}")
    plan.invalidate()


def test_the_read_order_is_measured_once_and_kept(tmp_path, monkeypatch):
    import numba

    from engine.backends.cpu import autotune
    from engine.runtime import tuning

    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(folder))
    monkeypatch.setattr(autotune, "DECODE_ORDER_PROBLEM", (2, 512, 64))  # small: the test is not a timing
    tuning.set_autotune(True)
    tuning._forget()
    try:
        got = autotune.tune_decode_order(np.dtype(np.float32))
        stored = tuning.lookup("decode-order/float32", lambda v: True)
        assert stored["sequential"] is got
        assert set(stored["ms"]) == {"interleaved", "sequential"} and all(t > 0 for t in stored["ms"].values())
        seq, inter = stored["ms"]["sequential"], stored["ms"]["interleaved"]
        assert seq == inter or got is (seq < inter)  # (stored rounded: equal ones say nothing)
        from engine.backends.cpu import _tuning_note  # what `attention-engine list` prints

        order = "address order" if got else "interleaved"
        assert f"decode float32 {order}" in _tuning_note(tuning.tuning_info())
        tuning._forget()  # a new process reads it back
        monkeypatch.setattr(autotune, "_measure", lambda *a: pytest.fail("measured again"))
        assert autotune.tune_decode_order(np.dtype(np.float32)) is got
        tuning.set_autotune(False)  # off: the fixed rule (interleaved)
        tuning._forget()
        assert autotune.tune_decode_order(np.dtype(np.float32)) is False
    finally:
        tuning.set_autotune(None)
        tuning._forget()
