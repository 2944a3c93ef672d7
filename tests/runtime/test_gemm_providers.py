"""The ``cpu`` kernel's tile-product providers (``engine.runtime.gemm_providers``, ``engine.kernels.cpu.gemm``).

Every provider that loads here is forced in turn and checked against the ``reference`` backend at
the suite's tolerance model, over masks, causal, GQA and mods; the provider's own product against
NumPy in float64 on every operand layout the kernels pass; and the choice (rule per vendor, the
environment variable, ``set_gemm_provider``, the calibration's decision on injected timings).
A provider not installed here is skipped with its reason (the ``test`` extra installs them all).
No test times anything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import engine
from engine.kernels.cpu.gemm import tile_gemm
from engine.runtime import gemm_providers as gp

from tolerances import assert_out_close, lse_atol, out_atol


def _provider_or_skip(name):
    got = gp.load_provider(name)
    if isinstance(got, str):
        pytest.skip(f"GEMM provider {name} not installed here: {got}")
    return got


@pytest.fixture
def forced(request):
    """Force a provider for one test, restore the automatic choice after."""
    yield lambda name: (_provider_or_skip(name), engine.set_gemm_provider(name))[0]
    engine.set_gemm_provider(None)


def _qkv(rng, dtype, B=1, Hq=2, H=2, L=150, S=291, E=24, Ev=20):  # odd last key tile
    return (
        rng.standard_normal((B, Hq, L, E)).astype(dtype),
        rng.standard_normal((B, H, S, E)).astype(dtype),
        rng.standard_normal((B, H, S, Ev)).astype(dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("provider", gp.PROVIDERS)
def test_forced_provider_matches_reference(provider, dtype, forced, rng):
    """Each provider over the kernel's call sites: masks, causal, GQA; lse too."""
    p = forced(provider)
    assert gp.get_gemm_provider(np.dtype(dtype).name) is p
    q, k, v = _qkv(rng, dtype)
    L, S = q.shape[2], k.shape[2]
    cases = [
        ("plain", q, k, v, {}),
        ("causal", q, k, v, {"is_causal": True}),
        ("bool mask", q, k, v, {"attn_mask": rng.random((L, S)) > 0.3}),
        ("float mask", q, k, v, {"attn_mask": rng.standard_normal((1, 2, L, S)).astype(dtype)}),
    ]
    qg, kg, vg = _qkv(rng, dtype, Hq=4, H=2)
    cases.append(("gqa", qg, kg, vg, {"enable_gqa": True}))
    for name, q_, k_, v_, kw in cases:
        out, lse = engine.scaled_dot_product_attention(q_, k_, v_, backend="cpu", return_lse=True, **kw)
        ref, ref_lse = engine.scaled_dot_product_attention(q_, k_, v_, backend="reference", return_lse=True, **kw)
        mask = kw.get("attn_mask")
        assert_out_close(out, ref, out_atol(dtype, q_, k_, v_, None, mask), f"{provider} {name} out")
        assert_out_close(lse, ref_lse, lse_atol(dtype, q_, k_, None, mask), f"{provider} {name} lse")


@pytest.mark.parametrize("provider", gp.PROVIDERS)
def test_forced_provider_with_mods_matches_reference(provider, forced, rng):
    """The built-in variants' mods (their kernels come from the disk cache: no compile per test)."""
    from variants.sliding_window import window_mask
    from variants.softcap import tanh_softcap

    forced(provider)
    q, k, v = _qkv(rng, np.float32)
    for kw in (
        {"score_mod": tanh_softcap, "mod_args": (np.float32(3.0),)},
        {"mask_mod": window_mask, "mod_args": (40, 100)},
    ):
        out = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
        ref = engine.scaled_dot_product_attention(q, k, v, backend="reference", **kw)
        assert_out_close(out, ref, out_atol(np.float32, q, k, v, None), f"{provider} {sorted(kw)}")


def _operand(rng, shape, dtype, order):
    a = rng.standard_normal(shape).astype(dtype)
    return np.asfortranarray(a) if order == "F" else a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("provider", gp.PROVIDERS)
def test_tile_gemm_every_layout_and_edge_size(provider, dtype, rng):
    """C = A @ B for C- and F-ordered operands (the kernel passes a transposed view), odd sizes,
    single rows/columns, and an empty inner dimension (C = 0)."""
    p = _provider_or_skip(provider)
    fn = p.pointer(np.dtype(dtype).name)
    for m, k, n in [(7, 5, 3), (1, 9, 4), (6, 1, 1), (33, 17, 65), (4, 0, 3)]:
        for oa in "CF":
            for ob in "CF":
                a, b = _operand(rng, (m, k), dtype, oa), _operand(rng, (k, n), dtype, ob)
                c = np.full((m, n), np.nan, dtype=dtype)
                tile_gemm(p.kind, fn, a, b, c)
                want = a.astype(np.float64) @ b.astype(np.float64)
                tol = (1e-5 if dtype == np.float32 else 1e-13) * max(1.0, k)
                np.testing.assert_allclose(c, want, rtol=0, atol=tol, err_msg=f"{provider} {m}x{k}x{n} a {oa} b {ob}")
    # a view whose rows are not contiguous either way goes to np.dot, still right
    big = rng.standard_normal((12, 10)).astype(dtype)
    a, b = big[::2, ::2], rng.standard_normal((5, 3)).astype(dtype)
    c = np.empty((6, 3), dtype=dtype)
    tile_gemm(p.kind, fn, a, b, c)
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=0, atol=1e-5)


def test_unknown_or_unloadable_provider_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"GEMM provider must be 'auto', 'calibrate' or one of .*mkl"):
        engine.set_gemm_provider("cublas")
    monkeypatch.setitem(gp._loaded, "openblas", "openblas: ImportError: No module named 'scipy_openblas32'")
    with pytest.raises(ValueError, match=r"'openblas' cannot be used on this machine: .*No module named"):
        engine.set_gemm_provider("openblas")
    monkeypatch.setenv(gp.ENV_VAR, "openblas")
    q = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"ATTENTION_ENGINE_GEMM='openblas' cannot be used"):
        engine.scaled_dot_product_attention(q, q, q, backend="cpu")
    monkeypatch.setenv(gp.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"ATTENTION_ENGINE_GEMM='fastest'"):
        engine.get_gemm_provider()


def test_environment_variable_forces_a_provider_and_set_overrides_it(monkeypatch):
    engine.set_gemm_provider(None)
    monkeypatch.setattr(gp, "_vendor", lambda: "GenuineIntel")  # auto would take MKL if installed
    monkeypatch.setenv(gp.ENV_VAR, "numpy")
    assert engine.get_gemm_provider().name == "numpy"
    others = [n for n in ("mkl", "openblas") if not isinstance(gp.load_provider(n), str)]
    if not others:
        pytest.skip("neither mkl nor scipy-openblas32 installed: nothing to override numpy with")
    monkeypatch.setenv(gp.ENV_VAR, others[0])
    assert engine.get_gemm_provider().name == others[0]
    engine.set_gemm_provider("numpy")
    try:
        assert engine.get_gemm_provider().name == "numpy"
    finally:
        engine.set_gemm_provider(None)


def test_auto_follows_the_vendor_rule(monkeypatch):
    monkeypatch.delenv(gp.ENV_VAR, raising=False)
    engine.set_gemm_provider(None)
    assert gp.auto_order("GenuineIntel")[0] == "mkl"
    assert gp.auto_order("AuthenticAMD") == ("numpy",)
    assert gp.auto_order("SomethingElse") == ("numpy",)
    monkeypatch.setattr(gp, "_vendor", lambda: "GenuineIntel")
    installed = [n for n in gp.auto_order("GenuineIntel") if not isinstance(gp.load_provider(n), str)]
    assert engine.get_gemm_provider("float32").name == installed[0]
    # no library has a 16-bit product the float32 kernel uses: numpy, whatever the rule
    assert engine.get_gemm_provider("bfloat16").name == "numpy"
    monkeypatch.setattr(gp, "_vendor", lambda: "AuthenticAMD")
    assert engine.get_gemm_provider("float32").name == "numpy"


def test_calibration_decision_on_injected_timings():
    assert gp.choose_fastest({"numpy": 1.0, "mkl": 0.5, "openblas": 0.9}) == "mkl"
    # numpy kept within the margin, not beyond it
    assert gp.choose_fastest({"numpy": 1.02, "mkl": 1.0}, margin=0.03) == "numpy"
    assert gp.choose_fastest({"numpy": 1.05, "mkl": 1.0}, margin=0.03) == "mkl"
    assert gp.choose_fastest({"openblas": 2.0, "mkl": 1.0}) == "mkl"
    # where numpy is kept, openblas instead when it is at least as fast as numpy, not when slower
    assert gp.choose_fastest({"numpy": 1.02, "openblas": 1.01, "mkl": 1.0}, margin=0.03) == "openblas"
    assert gp.choose_fastest({"numpy": 1.0, "openblas": 1.0}, margin=0.03) == "openblas"
    assert gp.choose_fastest({"numpy": 1.0, "openblas": 1.02, "mkl": 1.01}, margin=0.03) == "numpy"
    assert gp.choose_fastest({"numpy": 1.02, "openblas": 1.029, "mkl": 1.0}, margin=0.03) == "numpy"
    assert gp.choose_fastest({"numpy": 1.06, "openblas": 1.04, "mkl": 1.0}, margin=0.03) == "mkl"
    assert gp.choose_fastest({"numpy": 1.06, "openblas": 1.0, "mkl": 1.01}, margin=0.03) == "openblas"


def test_fma_only_when_faster_than_every_library_by_the_margin():
    # the engine's own product must beat the fastest library by more than the margin
    assert gp.choose_fastest({"numpy": 1.0, "openblas": 1.0, "fma": 0.98}, margin=0.03) == "openblas"
    assert gp.choose_fastest({"numpy": 1.0, "openblas": 1.1, "fma": 0.9}, margin=0.03) == "fma"
    assert gp.choose_fastest({"numpy": 1.0, "mkl": 0.8, "fma": 0.79}, margin=0.03) == "mkl"
    assert gp.choose_fastest({"numpy": 1.0, "mkl": 0.8, "fma": 0.7}, margin=0.03) == "fma"
    # slower than a library, or alone
    assert gp.choose_fastest({"numpy": 1.0, "fma": 1.5}, margin=0.03) == "numpy"
    assert gp.choose_fastest({"fma": 1.0}) == "fma"
    # the libraries' own rule is unchanged where fma does not win
    assert gp.choose_fastest({"numpy": 1.02, "mkl": 1.0, "fma": 0.99}, margin=0.03) == "numpy"


@pytest.mark.parametrize(
    "width, error",
    [(None, TypeError), (64.0, TypeError), ("64", TypeError), (True, TypeError), (0, ValueError), (-5, ValueError)],
)
def test_a_bad_width_is_refused_by_name(width, error):
    with pytest.raises(error, match="width"):
        engine.get_gemm_provider("float32", width)
    assert engine.get_gemm_provider("float32", np.int64(96)).name in gp.PROVIDERS


def test_calibrate_mode_picks_an_installed_candidate(monkeypatch):
    monkeypatch.setattr(gp, "_calibrated", {})
    monkeypatch.setattr(gp, "_calibrate", lambda dt, cands: (cands[-1].name, {c.name: 1.0 for c in cands}))
    engine.set_gemm_provider("calibrate")
    try:
        installed = [n for n in gp.GEMM_CALIBRATION_CANDIDATES if not isinstance(gp.load_provider(n), str)]
        want = installed[-1] if len(installed) > 1 else "numpy"
        assert engine.get_gemm_provider("float64").name == want
    finally:
        engine.set_gemm_provider(None)


def test_list_says_which_provider_runs():
    caps = engine.get_backend("cpu").capabilities()
    info = caps["gemm"]
    assert info["in_use"]["float32"] in gp.PROVIDERS and info["providers"]["numpy"]
    res = subprocess.run(
        [sys.executable, "-m", "engine.cli", "list"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(__import__("os").environ, ATTENTION_ENGINE_GEMM="numpy"),
    )
    assert "cpu: tile products (numpy): float32 numpy (SciPy's" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "engine.cli", "list", "--json"], capture_output=True, text=True, check=True
    )
    cpu = next(b for b in json.loads(res.stdout)["backends"] if b["name"] == "cpu")
    assert set(cpu["gemm"]["in_use"]) == {"float32", "float64", "bfloat16", "float16"}
    assert cpu["gemm"]["in_use"]["bfloat16"].endswith(("(16-bit GEMM)", "(widened to float32)"))


def test_list_says_which_provider_is_requested_beside_those_measured_for_auto(monkeypatch):
    """`attention-engine list`'s tuning line: the providers measured for ``auto`` are marked so
    while one is requested (ATTENTION_ENGINE_GEMM or set_gemm_provider)."""
    from engine.backends.cpu import _tuning_note

    info = {"enabled": True, "path": None, "choices": {gp.provider_key("float32"): {"provider": "numpy"}}}
    engine.set_gemm_provider(None)
    monkeypatch.delenv("ATTENTION_ENGINE_GEMM", raising=False)
    auto = _tuning_note(info)
    assert "float32 numpy" in auto and "requested now" not in auto
    engine.set_gemm_provider("numpy")
    try:
        forced = _tuning_note(info)
    finally:
        engine.set_gemm_provider(None)
    assert "providers measured for auto (numpy requested now) float32 numpy" in forced
