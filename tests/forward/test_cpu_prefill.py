"""The ``cpu`` forward's prefill machinery: the one-pass softmax with a kept shift (redone where a
tile passes the margin), the generated GEMMs of full tiles, ``softmax_exp``'s contract, 512-bit
vectors, and the tiles measured per machine (``engine.runtime.tuning``, ``backends.cpu.autotune``):
stored, read back, refused when someone else could have written them, used by the forward and the
backward alike."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import engine
import engine.backends.cpu.autotune as autotune
import engine.backends.cpu.forward as cpu_forward
import engine.backends.cpu.tiles as cpu_tiles
from engine.kernels.cpu.softmax_tile import STALE_MAX_MARGIN
from engine.kernels.fastexp import softmax_exp_array
from engine.runtime import tuning
from engine.runtime.gemm_jit import NO_JIT, tile_jit_kernels
from engine.runtime.gemm_providers import load_provider

from conftest import HANG_TIMEOUT_S
from tolerances import assert_out_close, lse_atol, out_atol

DTYPES = [np.float32, np.float64]


def _check(q, k, v, dtype, **kw):
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert out.dtype == dtype
    mask = kw.get("attn_mask")
    assert_out_close(out, ref, out_atol(dtype, q, k, v, kw.get("scale"), mask), what="cpu out")
    assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, kw.get("scale"), mask), what="cpu lse")
    return out, lse


@pytest.fixture
def small_tiles(monkeypatch):
    """8 x 16 tiles, 2 per task: many key tiles per row on small inputs."""
    monkeypatch.setattr(cpu_tiles, "CPU_BIG_BLOCK_Q", 8)
    monkeypatch.setattr(cpu_tiles, "CPU_BLOCK_K", 16)
    monkeypatch.setattr(cpu_tiles, "CPU_TASK_ROWS", 16)


# ---------------------------------------------------------------- the one-pass softmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("jump", [0.5, STALE_MAX_MARGIN - 0.25, STALE_MAX_MARGIN + 0.25, 30.0, 150.0])
def test_scores_rising_tile_after_tile(small_tiles, dtype, jump):
    """Each key tile scores ``jump`` above the one before: within the margin the shift is kept
    (weights up to exp(margin)); beyond it the pass is redone with the new maximum, also where
    the old shift would overflow the exponential (150)."""
    L, S, E = 11, 80, 4
    q = np.zeros((1, 2, L, E), dtype)
    q[..., 0] = 1.0
    k = np.zeros((1, 2, S, E), dtype)
    k[..., 0] = (np.arange(S) // 16 * jump).astype(dtype)
    v = np.random.default_rng(3).standard_normal((1, 2, S, E)).astype(dtype)
    out, _ = _check(q, k, v, dtype, scale=1.0)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [-40.0, -0.5, 0.0, 3.0, STALE_MAX_MARGIN, STALE_MAX_MARGIN + 0.5, 90.0])
def test_plain_call_first_tile_maximum_anywhere(small_tiles, dtype, first, rng):
    """A call without masks or mods, rows whose first tile's maximum is far below 0, near it, or
    beyond the margin, in one tile (even rows a quarter of the odd ones), and later tiles more
    than the margin above it (head 1): the first tile sets each row's shift, later ones keep or
    raise it."""
    L, S, E = 16, 48, 4
    q = np.zeros((1, 2, L, E), dtype)
    q[..., 0] = 1.0
    q[:, :, ::2, 0] = 0.25  # even rows: a quarter of each score
    k = np.zeros((1, 2, S, E), dtype)
    k[..., 0] = first + rng.uniform(-1.0, 0.0, S).astype(dtype)
    k[:, 1, 20:, 0] += 12.0  # head 1: later tiles above the first's maximum by more than the margin
    v = rng.standard_normal((1, 2, S, E)).astype(dtype)
    _check(q, k, v, dtype, scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_call_rows_with_infinite_or_nan_queries(small_tiles, dtype, rng):
    """An inf in q makes inf/NaN scores in a call without masks: the row is NaN as the reference's;
    the other rows are untouched."""
    q, k, v = (rng.standard_normal((1, 1, n, 4)).astype(dtype) for n in (8, 40, 40))
    q[0, 0, 2, 1] = np.inf
    q[0, 0, 5, 0] = np.nan
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference")
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.allclose(out[ok], ref[ok], atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_falling_and_mixed_rows(small_tiles, dtype, rng):
    """Falling scores (the first tile's shift stays), and rows whose maximum arrives in
    different key tiles."""
    L, S, E = 19, 96, 8
    q = rng.standard_normal((1, 3, L, E)).astype(dtype) * 3
    k = rng.standard_normal((1, 3, S, E)).astype(dtype) * 3
    k[:, 1] *= np.linspace(4, 0.1, S, dtype=dtype)[:, None]
    k[:, 2] *= np.linspace(0.1, 4, S, dtype=dtype)[:, None]
    v = rng.standard_normal((1, 3, S, E)).astype(dtype)
    _check(q, k, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_that_see_nothing_until_a_late_tile(small_tiles, dtype, rng):
    """Boolean masks hiding the first key tiles of some rows: those rows take the tile maximum
    first (no shift yet) while the others keep theirs."""
    L, S, E = 16, 64, 8
    q, k, v = (rng.standard_normal((1, 2, n, E)).astype(dtype) for n in (L, S, S))
    m = np.ones((L, S), bool)
    m[::2, :40] = False  # even rows see keys 40.. only
    m[3] = False  # a row that sees nothing
    out, lse = _check(q, k, v, dtype, attn_mask=m)
    assert np.all(out[:, :, 3] == 0) and np.all(lse[:, :, 3] == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_score_and_nan_score_rows(small_tiles, dtype, rng):
    """A +inf score in a later tile makes its row NaN (inf - inf), as the reference; a NaN score
    too; other rows are untouched."""
    L, S, E = 8, 48, 4
    q, k, v = (rng.standard_normal((1, 1, n, E)).astype(dtype) for n in (L, S, S))
    fm = np.zeros((L, S), dtype)
    fm[2, 40] = np.inf
    fm[5, 33] = np.nan
    out = engine.scaled_dot_product_attention(q, k, v, attn_mask=fm, backend="cpu")
    ref = engine.scaled_dot_product_attention(q, k, v, attn_mask=fm, backend="reference")
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.allclose(out[ok], ref[ok], atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_value_in_a_full_tile_reaches_only_rows_that_weigh_it(small_tiles, dtype, rng):
    """The values product accumulates in the GEMM (beta = 1) only for finite value tiles; an inf
    value goes through the exact path, so a row giving that key weight 0 stays finite."""
    L, S, E = 8, 32, 4
    q, k, v = (rng.standard_normal((1, 1, n, E)).astype(dtype) for n in (L, S, S))
    v[0, 0, 20, 1] = np.inf
    m = np.ones((L, S), bool)
    m[:4, 20] = False  # rows 0-3 do not see key 20
    out = engine.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="cpu")
    ref = engine.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="reference")
    assert np.isfinite(out[0, 0, :4]).all()
    assert np.array_equal(np.isfinite(out), np.isfinite(ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("provider", ["mkl", "openblas", "fma", "numpy"])
def test_every_provider_with_full_and_partial_tiles(dtype, provider, rng):
    """Full tiles through MKL's generated GEMMs (where MKL generates them), the edges through
    ?gemm; other providers through theirs."""
    if isinstance(load_provider(provider), str):
        pytest.skip(load_provider(provider))
    engine.set_gemm_provider(provider)
    try:
        bq, bk = cpu_tiles.tile_sizes(1 << 20, 64, 64, blas_pinned=True)
        for L, S in ((2 * bq, 2 * bk), (2 * bq + 5, 2 * bk + 7)):
            q, k, v = (rng.standard_normal((1, 2, n, 64)).astype(dtype) for n in (L, S, S))
            _check(q, k, v, dtype)
            _check(q, k, v, dtype, is_causal=True)
    finally:
        engine.set_gemm_provider(None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("provider", ["mkl", "openblas", "fma", "numpy"])
def test_query_copies_of_several_tiles_per_task(dtype, provider, rng):
    """Each task copies its query tiles transposed (one (E, rows) block per tile, the last one
    narrower): tasks of 2 and 3 tiles, a last tile and a last task cut short, causal rows offset
    from the keys, given tiles on the serial and the parallel build, each provider."""
    p = load_provider(provider)
    if isinstance(p, str):
        pytest.skip(p)
    from engine.dispatch import get_backend
    from engine.problems.attention import validate_attention_args

    op = cpu_forward.CpuForward(get_backend("cpu"))
    for (L, S, E), (bq, bk, sub) in (
        ((53, 40, 7), (8, 16, 3)),
        ((37, 70, 24), (16, 32, 2)),
        ((64, 64, 5), (32, 16, 2)),
    ):
        q = rng.standard_normal((2, 2, L, E)).astype(dtype)
        k, v = (rng.standard_normal((2, 2, S, E)).astype(dtype) for _ in range(2))
        for kw in ({}, {"is_causal": True}):
            problem = validate_attention_args(q, k, v, **kw)
            ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
            for serial in (True, False):
                out, lse = op.run(problem, plan=cpu_tiles.TilePlan(bq, bk, sub, True), provider=p, serial=serial)
                what = f"{provider} L={L} S={S} E={E} tiles {bq}x{bk}x{sub} {kw} serial={serial}"
                assert_out_close(out, ref, out_atol(dtype, q, k, v, None, None), what=what)
                assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, None, None), what=what + " lse")


def test_generated_gemms_only_for_mkl_float():
    assert tile_jit_kernels(load_provider("numpy"), "float32", 128, 256, 64, 64) == NO_JIT
    mkl = load_provider("mkl")
    if isinstance(mkl, str):
        pytest.skip(mkl)
    assert tile_jit_kernels(mkl, "bfloat16", 128, 256, 64, 64) == NO_JIT
    got = tile_jit_kernels(mkl, "float32", 128, 256, 64, 64)
    assert got == NO_JIT or all(x > 0 for x in got)  # MKL may decline to generate code
    assert tile_jit_kernels(mkl, "float32", 128, 256, 64, 64) == got  # made once


# ---------------------------------------------------------------- softmax_exp and vector width


@pytest.mark.parametrize(
    "dtype, bound, hi", [(np.float32, 2.5e-7, 88.0), (np.float64, 1e-15, 709.0)], ids=["float32", "float64"]
)
def test_softmax_exp_contract(dtype, bound, hi):
    tiny = np.finfo(dtype).tiny
    x = np.concatenate(
        [
            -np.logspace(-30, np.log10(-np.log(tiny) * 1.2), 300_000),
            np.logspace(-30, np.log10(hi), 100_000),
            np.arange(-800, 800) * np.log(2) / 2,
            [0.0, -0.0],
        ]
    ).astype(dtype)
    x = x[x <= hi]
    got = np.empty_like(x)
    softmax_exp_array(x, got)
    exact = np.exp(x.astype(np.longdouble))
    normal = exact >= tiny
    rel = np.abs((got[normal] - exact[normal]) / exact[normal])
    assert float(rel.max()) < bound
    assert np.all((got[~normal] == 0) | (np.abs(got[~normal] - exact[~normal]) <= tiny))
    special = np.array([-np.inf, np.nan, np.finfo(dtype).min, -1e30, hi * -1.01], dtype=dtype)
    out = np.empty_like(special)
    softmax_exp_array(special, out)
    assert np.isnan(out[1]) and np.all(out[[0, 2, 3, 4]] == 0) and not np.signbit(out[[0, 2, 3, 4]]).any()


def test_softmax_pass_asks_for_512_bit_vectors():
    from engine.kernels.cpu.softmax_tile import exp_tile

    st = np.zeros((4, 16), np.float32)
    args = (st, np.empty_like(st), np.float32(1), np.zeros(16, np.float32), np.zeros(16), np.zeros(16, np.float32))
    exp_tile(*args, np.zeros(16, np.float32))
    ir = next(iter(exp_tile.inspect_llvm().values()))
    assert '"prefer-vector-width"="512"' in ir


# ---------------------------------------------------------------- the tuning cache


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch):
    """Tuning on, with a private cache folder of its own; what the process knew is dropped."""
    import numba

    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(folder))
    tuning.set_autotune(True)
    tuning._forget()
    yield folder
    tuning.set_autotune(None)
    tuning._forget()


@pytest.fixture
def tuning_in_memory(monkeypatch):
    """Tuning on and kept in memory only (no file): what the process knew is dropped. Unlike
    ``tuning_dir`` it leaves Numba's cache folder alone, so no kernel compiles again."""
    monkeypatch.setattr(tuning, "tuning_path", lambda: None)
    tuning.set_autotune(True)
    tuning._forget()
    yield
    tuning.set_autotune(None)
    tuning._forget()


def _valid(v):
    return isinstance(v.get("x"), int)


def test_tuned_measures_once_and_stores_privately(tuning_dir):
    calls = []

    def measure():
        calls.append(1)
        return {"x": 7}

    assert tuning.tuned("test/a", measure, _valid) == {"x": 7}
    assert tuning.tuned("test/a", measure, _valid) == {"x": 7}
    assert calls == [1]
    path = tuning.tuning_path()
    assert os.path.dirname(path) == str(tuning_dir)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    data = json.load(open(path))
    assert data["choices"]["test/a"] == {"x": 7} and "cpu" in data["machine"]
    tuning._forget()  # a new process: read back from disk, not measured again
    assert tuning.lookup("test/a", _valid) == {"x": 7}
    assert tuning.tuned("test/a", measure, _valid) == {"x": 7} and calls == [1]


def test_invalid_or_unreadable_choices_are_measured_again(tuning_dir):
    tuning.tuned("test/b", lambda: {"x": 1}, _valid)
    path = tuning.tuning_path()
    data = json.load(open(path))
    data["choices"]["test/b"] = {"x": "not an int"}
    with open(path, "w") as f:
        json.dump(data, f)
    tuning._forget()
    assert tuning.lookup("test/b", _valid) is None
    assert tuning.tuned("test/b", lambda: {"x": 2}, _valid) == {"x": 2}
    with open(path, "w") as f:
        f.write("{garbage")
    tuning._forget()
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert tuning.tuned("test/b", lambda: {"x": 3}, _valid) == {"x": 3}


def test_file_writable_by_others_is_ignored_and_kept(tuning_dir):
    tuning.tuned("test/c", lambda: {"x": 1}, _valid)
    path = tuning.tuning_path()
    os.chmod(path, 0o666)
    before = open(path).read()
    tuning._forget()
    tuning._warned.clear()
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert tuning.lookup("test/c", _valid) is None
    assert tuning.tuned("test/c", lambda: {"x": 5}, _valid) == {"x": 5}  # this process only
    assert open(path).read() == before


def test_another_numba_target_reads_another_file(tuning_dir, monkeypatch):
    """Tiles measured with AVX2 code (NUMBA_CPU_NAME/NUMBA_CPU_FEATURES set on an AVX-512 CPU)
    are kept apart from the host's: the same /proc/cpuinfo shared one file until 2026-12-07."""
    import numba

    tuning.tuned("test/t", lambda: {"x": 1}, _valid)
    before = tuning.tuning_path()
    monkeypatch.setattr(numba.config, "CPU_NAME", "znver3")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx,+avx2,+fma")
    tuning._forget()
    assert tuning.tuning_path() != before
    assert tuning.lookup("test/t", _valid) is None


def test_edited_kernels_read_another_file(tuning_dir, monkeypatch):
    """The file's name hashes the cpu kernels' source: choices measured before an edit of a
    checkout's kernels (its version number unchanged) are measured again."""
    tuning.tuned("test/e", lambda: {"x": 1}, _valid)
    before = tuning.tuning_path()
    assert tuning.machine_fingerprint()["kernels"] == tuning._kernels_digest()
    monkeypatch.setattr(tuning, "_KERNELS_DIGEST", ["edited"])
    tuning._forget()
    assert tuning.tuning_path() != before
    assert tuning.lookup("test/e", _valid) is None


def test_the_tuners_rules_are_in_the_file_name(monkeypatch):
    """Choices stored under another rule for choosing them (``choose_fastest``, the tuner's
    problems) are measured again: those files' source is hashed with the kernels'."""
    assert ("runtime", "gemm_providers.py") in tuning._RULE_FILES
    monkeypatch.setattr(tuning, "_KERNELS_DIGEST", [])
    full = tuning._kernels_digest()
    monkeypatch.setattr(tuning, "_KERNELS_DIGEST", [])
    monkeypatch.setattr(tuning, "_RULE_FILES", tuning._RULE_FILES[:1])
    assert tuning._kernels_digest() != full


def test_autotune_off_reads_and_writes_nothing(tuning_dir):
    tuning.set_autotune(False)
    assert tuning.tuned("test/d", lambda: {"x": 1}, _valid) is None
    assert not any(tuning_dir.iterdir())
    with pytest.raises(ValueError, match="True, False or None"):
        tuning.set_autotune("yes")


def test_environment_turns_tuning_off():
    code = "from engine.runtime import tuning; print(tuning.autotune_enabled())"
    for value, expect in (("0", "False"), ("off", "False"), ("1", "True")):
        env = dict(os.environ, ATTENTION_ENGINE_AUTOTUNE=value)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
        )
        assert out.stdout.strip() == expect, out.stderr


# ---------------------------------------------------------------- measured tiles in use


def test_stored_tiles_are_used_by_forward_and_backward(tuning_dir, rng, monkeypatch):
    """A stored choice for the class decides both passes' tiles; the result is the reference's."""
    provider = engine.get_gemm_provider("float32").name
    key = cpu_tiles.tile_key(provider, "float32", 64, "short")
    tuning.tuned(key, lambda: {"block_q": 32, "block_k": 64, "task_rows": 64}, cpu_tiles.valid_tiles)
    plan = cpu_tiles.forward_tiles(300, 16, 16, "float32", provider, True, 64, 2)
    assert plan == cpu_tiles.TilePlan(32, 64, 2, True)
    assert cpu_tiles.backward_tile_sizes(300, 400, 16, 16, True, "float32", provider)[1:] == (64, 32)
    seen = _record_setups(monkeypatch)
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for n in (300, 400, 400))
    _check(q, k, v, np.float32, is_causal=True)
    assert (seen[-1].block_q, seen[-1].block_k) == (32, 64)
    out, lse = engine.scaled_dot_product_attention(q, k, v, return_lse=True, backend="cpu")
    do = rng.standard_normal(out.shape).astype(np.float32)
    got = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu")
    ref = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="reference")
    for g, r in zip(got, ref):
        assert np.allclose(g, r, atol=2e-5)


def test_short_keys_take_a_key_tile_no_longer_than_S(rng, monkeypatch):
    """Keys fewer than a tile get a key tile of S rounded up to 16 rows, in both passes (the
    backward recomputes with the forward's tiles), and the results stay the reference's."""
    rule = cpu_tiles.forward_tiles(32, 16, 16, "float32", "none", True, 8, 2)
    for S, block_k in ((32, 32), (40, 48), (1, 16), (10**6, rule.block_k)):
        assert cpu_tiles.forward_tiles(32, 16, 16, "float32", "none", True, 8, 2, S=S).block_k == min(
            block_k, rule.block_k
        )
        assert cpu_tiles.backward_tile_sizes(32, S, 16, 16, True, "float32", "none")[1] == min(block_k, rule.block_k)
    seen = _record_setups(monkeypatch)
    for S in (32, 40):
        q, k, v = (rng.standard_normal((2, 2, n, 16)).astype(np.float32) for n in (24, S, S))
        out, lse = _check(q, k, v, np.float32, is_causal=True)
        assert seen[-1].block_k == min(-(-S // 16) * 16, rule.block_k)
        do = rng.standard_normal(out.shape).astype(np.float32)
        kw = dict(is_causal=True)
        got = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu", **kw)
        ref = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="reference", **kw)
        for g, r in zip(got, ref):
            assert np.allclose(g, r, atol=2e-5)


def _record_setups(monkeypatch) -> list:
    """The forward's kernel set-ups (tiles, provider, kernel) from now on, in order: every call
    without a plan and every plan's prepared runner makes one."""
    seen = []
    real = cpu_forward._setup
    monkeypatch.setattr(cpu_forward, "_setup", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    return seen


def test_call_plans_follow_what_tuning_knows(tuning_dir, rng, monkeypatch):
    """A call plan made before a choice was stored is not used after it (its tiles would no longer
    be those the backward recomputes with), nor one made with tuning on once it is off."""
    from engine import plan as plans

    seen = _record_setups(monkeypatch)
    q, k, v = (rng.standard_normal((1, 2, n, 16)).astype(np.float32) for n in (300, 400, 400))
    for _ in range(2):  # the second through the plan
        engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    rule = (seen[-1].block_q, seen[-1].block_k)
    token = plans.runtime_token()
    key = cpu_tiles.tile_key(engine.get_gemm_provider("float32").name, "float32", 64, "short")
    tuning.tuned(key, lambda: {"block_q": 32, "block_k": 64, "task_rows": 64}, cpu_tiles.valid_tiles)
    assert plans.runtime_token() != token
    for _ in range(2):
        engine.scaled_dot_product_attention(q, k, v, backend="cpu")
        assert (seen[-1].block_q, seen[-1].block_k) == (32, 64) != rule
    tuning.set_autotune(False)
    engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert (seen[-1].block_q, seen[-1].block_k) == rule


def test_rows_per_task_shrink_until_every_thread_has_work():
    plan = cpu_tiles.forward_tiles(1024, 64, 64, "float32", "none", True, 1, 2)  # nothing stored: the rule
    assert not plan.tuned
    tasks = -(-1024 // (plan.block_q * plan.sub_tiles))
    assert tasks >= 4 * 2 or plan.sub_tiles == 1
    one = cpu_tiles.forward_tiles(64, 64, 64, "float32", "none", True, 1, 8)
    assert one.sub_tiles == 1 and one.block_q == 64


def test_invalid_stored_tiles_fall_back_to_the_rule(tuning_dir):
    key = cpu_tiles.tile_key("numpy", "float32", 64, "medium")
    for bad in ({"block_q": 0, "block_k": 64, "task_rows": 64}, {"block_q": 64, "block_k": 10**9, "task_rows": 64}):
        tuning._memory[key] = bad
        plan = cpu_tiles.forward_tiles(1024, 64, 64, "float32", "numpy", True, 8, 2)
        assert not plan.tuned and plan.block_q >= 1


def _shrink_tuning(monkeypatch):
    """Every call measures what tuning lacks, on small class problems and few candidates."""
    monkeypatch.setattr(cpu_forward, "CPU_TUNE_MIN_WORK", 1)
    monkeypatch.setattr(autotune, "CLASS_PROBLEMS", {"short": (1, 64, 64), "medium": (1, 64, 64), "long": (1, 64, 128)})
    monkeypatch.setattr(cpu_tiles, "BLOCK_Q_CHOICES", (32, 64))
    monkeypatch.setattr(autotune, "BLOCK_Q_CHOICES", (32, 64))
    monkeypatch.setattr(autotune, "BLOCK_K_CHOICES", (64, 128))


def test_first_large_call_measures_its_class(tuning_dir, rng, monkeypatch):
    """A call above ``CPU_TUNE_MIN_WORK`` measures the provider and its class's tiles (shrunk
    here to keep the test short), stores them, and computes the right result; ``attention-engine
    list`` then names them."""
    _shrink_tuning(monkeypatch)
    q, k, v = (rng.standard_normal((1, 2, n, 32)).astype(np.float32) for n in (96, 100, 100))
    _check(q, k, v, np.float32)
    choices = tuning.tuning_info()["choices"]
    provider = choices["cpu-gemm/float32"]["provider"]
    tiles = choices[cpu_tiles.tile_key(provider, "float32", 64, "short")]
    assert cpu_tiles.valid_tiles(tiles) and tiles["block_q"] in (32, 64) and tiles["block_k"] in (64, 128)
    assert engine.get_gemm_provider("float32").name == provider
    notes = " ".join(engine.get_backend("cpu").capabilities()["notes"])
    assert f"float32/w64/short {tiles['block_q']}x{tiles['block_k']}" in notes


def test_bf16_rounding_of_probabilities_matches_ml_dtypes_but_subnormals():
    """The probabilities' bfloat16 rounding (the CPU's own conversion where it has AVX512-BF16):
    nearest even as ml_dtypes for every normal float32, NaN stays NaN, subnormals 0 or as
    ml_dtypes."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from engine.kernels.cpu.half import f32_to_bf16_ftz_array

    bits = np.arange(0, 2**32, 97, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([bits, np.array([0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000, 0x00000001], np.uint32)])
    x = bits.view(np.float32)
    got = np.empty(x.shape, np.uint16)
    f32_to_bf16_ftz_array(x, got)
    with np.errstate(invalid="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    sub = (np.abs(x) < np.finfo(np.float32).tiny) & ~nan
    assert np.array_equal(got[~nan & ~sub], ref[~nan & ~sub])
    assert np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()
    assert np.all((got[sub] & 0x7FFF == 0) | (got[sub] == ref[sub]))


def _spy_providers(monkeypatch, *modules) -> list:
    """(dtype, width, provider name) of every ``get_gemm_provider`` call these modules make."""
    from engine.runtime.gemm_providers import get_gemm_provider

    seen = []

    def spy(dtype_name="float32", width=64):
        got = get_gemm_provider(dtype_name, width)
        seen.append((dtype_name, width, got.name))
        return got

    for module in modules:
        monkeypatch.setattr(module, "get_gemm_provider", spy)
    return seen


def _store_provider(dtype: str, width: int, name: str):
    from engine.runtime.gemm_providers import provider_key, valid_provider_choice

    tuning.tuned(provider_key(dtype, width), lambda: {"provider": name, "ms": {}}, valid_provider_choice)


def test_heads_over_64_take_the_provider_measured_for_them(tuning_in_memory, rng, monkeypatch):
    """The provider stored for heads over 64 runs their forward and backward (and varlen's); heads
    up to 64 keep the dtype's; the results stay the reference's."""
    import engine.backends.cpu.backward as cpu_backward
    import engine.backends.cpu.varlen as cpu_varlen

    if isinstance(load_provider("openblas"), str):
        pytest.fail("scipy-openblas32 is a dependency of the engine: " + load_provider("openblas"))
    _store_provider("float32", 64, "numpy")
    _store_provider("float32", 128, "openblas")
    seen = _spy_providers(monkeypatch, cpu_forward, cpu_backward, cpu_varlen)
    for E, want in ((96, "openblas"), (128, "openblas"), (200, "openblas"), (64, "numpy"), (16, "numpy")):
        seen.clear()
        q, k, v = (rng.standard_normal((1, 2, n, E)).astype(np.float32) for n in (40, 56, 56))
        out, lse = _check(q, k, v, np.float32, is_causal=True)
        do = rng.standard_normal(out.shape).astype(np.float32)
        got = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu", is_causal=True)
        ref = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="reference", is_causal=True)
        for g, r in zip(got, ref):
            assert np.allclose(g, r, atol=2e-5)
        assert {name for _, _, name in seen} == {want} and len(seen) >= 2, (E, seen)
    seen.clear()
    q, k, v = (rng.standard_normal((50, 2, 96)).astype(np.float32) for _ in range(3))
    cu = np.array([0, 20, 50], np.int32)
    got = engine.varlen_attention(q, k, v, cu, cu, is_causal=True, backend="cpu")
    ref = engine.varlen_attention(q, k, v, cu, cu, is_causal=True, backend="reference")
    assert np.allclose(got, ref, atol=2e-5)
    assert seen and {name for _, _, name in seen} == {"openblas"}


def test_a_width_without_its_own_measurement_takes_the_other_one(tuning_dir):
    """Until a class is measured, its calls take the dtype's other class's measurement, then the
    vendor's rule; forcing a provider overrides every width."""
    from engine.runtime.gemm_providers import auto_order

    rule = next(n for n in auto_order() if not isinstance(load_provider(n), str))
    assert engine.get_gemm_provider("float32", 128).name == rule
    _store_provider("float32", 128, "numpy")
    assert engine.get_gemm_provider("float32", 64).name == "numpy"
    assert engine.get_gemm_provider("float32").name == "numpy"
    _store_provider("float32", 64, "openblas")
    assert engine.get_gemm_provider("float32", 64).name == "openblas"
    assert engine.get_gemm_provider("float32", 128).name == "numpy"
    assert engine.get_gemm_provider("float32", 512).name == "numpy"
    info = engine.get_backend("cpu").capabilities()["gemm"]
    assert info["measured"]["float32, heads over 64"] == "numpy" and info["measured"]["float32"] == "openblas"
    assert info["in_use"]["float32, heads over 64"] == "numpy"
    engine.set_gemm_provider("numpy")
    try:
        assert engine.get_gemm_provider("float32", 64).name == engine.get_gemm_provider("float32", 128).name == "numpy"
    finally:
        engine.set_gemm_provider(None)


def test_first_large_call_with_wide_heads_measures_their_provider(tuning_dir, rng, monkeypatch):
    """A large call with heads over 64 measures the provider on the 128-wide class (every
    installed provider's tiles there, kept), apart from the dtype's head-64 choice."""
    from engine.runtime.gemm_providers import provider_key

    _shrink_tuning(monkeypatch)
    q, k, v = (rng.standard_normal((1, 2, n, 100)).astype(np.float32) for n in (96, 100, 100))
    _check(q, k, v, np.float32)
    choices = tuning.tuning_info()["choices"]
    assert provider_key("float32", 64) not in choices  # nothing measured for heads up to 64
    got = choices[provider_key("float32", 128)]
    assert engine.get_gemm_provider("float32", 100).name == got["provider"]
    for name in got["ms"]:  # each candidate's tiles of that class were searched and kept
        assert cpu_tiles.valid_tiles(choices[cpu_tiles.tile_key(name, "float32", 128, "medium")])
    assert "numpy" in got["ms"] and len(got["ms"]) >= 2


@pytest.mark.parametrize(("E", "Ev", "cls"), [(64, 64, 64), (8, 64, 64), (64, 65, 128), (128, 32, 128), (129, 8, None)])
def test_tiles_and_provider_share_one_width_class(E, Ev, cls):
    """Heads up to 64 wide are the 64 class, to 128 the 128 class (the provider's key gains
    "/w128"), wider ones take the fixed tiles but the 128 class's provider."""
    from engine.runtime.gemm_providers import provider_key

    got = cpu_tiles.tile_class(1024, E, Ev)
    assert (got and got[0]) == cls
    assert provider_key("float32", max(E, Ev)).endswith("/w128") == (cls != 64)


def test_list_names_only_stored_choices_the_engine_would_use(tuning_dir, monkeypatch):
    """A stored provider or tiles the engine refuses (a file edited by hand, another version) is
    not listed as measured; a widened 16-bit call's line names the wide heads' provider too."""
    import engine.runtime.gemm_info as gemm_info
    from engine.runtime.gemm_providers import provider_key

    tuning._memory[provider_key("float32", 128)] = {"provider": "bogus"}
    tuning._memory[provider_key("float64", 128)] = ["not", "a", "dict"]
    tuning._memory[cpu_tiles.tile_key("numpy", "float32", 64, "medium")] = {
        "block_q": 0,
        "block_k": 64,
        "task_rows": 64,
    }
    good = {"block_q": 64, "block_k": 128, "task_rows": 256}
    tuning._memory[cpu_tiles.tile_key("bogus", "float32", 64, "medium")] = good  # a key nobody reads
    tuning._memory["cpu-gemm/float32/w256"] = {"provider": "mkl"}
    tuning._memory["cpu-gemm/bfloat16"] = {"provider": "numpy"}
    tuning._memory["decode-order/float32"] = {"sequential": "yes"}
    notes = " ".join(engine.get_backend("cpu").capabilities()["notes"])
    assert "bogus" not in notes and "w128" not in notes and "medium 0x64" not in notes
    assert "w256" not in notes and "bfloat16 numpy" not in notes and "decode float32" not in notes
    assert engine.get_gemm_provider("float32", 128).name != "bogus"
    _store_provider("float32", 64, "numpy")
    tuning._memory.pop(provider_key("float32", 128))
    _store_provider("float32", 128, "openblas")
    monkeypatch.setattr(gemm_info, "sixteen_bit_gemm", lambda dt: None)
    monkeypatch.setattr(gemm_info, "sixteen_bit_tiles", lambda dt: (None, None))
    info = engine.get_backend("cpu").capabilities()
    assert info["gemm"]["in_use"]["float16"] == "numpy, heads over 64 openblas (widened to float32)"
    notes = " ".join(info["notes"])
    assert "float32/w128 openblas" in notes and "float32 numpy" in notes
    tuning._memory["decode-order/float32"] = {"sequential": True}
    tuning._memory[cpu_tiles.tile_key("openblas", "float32", 128, "long")] = good
    notes = " ".join(engine.get_backend("cpu").capabilities()["notes"])
    assert "decode float32 address order" in notes and "openblas/float32/w128/long 64x128/256" in notes
