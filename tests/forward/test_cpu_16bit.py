"""float16 and bfloat16 on the ``cpu`` backend: same semantics as float32, 16-bit outputs and lse.

Three paths run: ``widened`` (inputs widened to float32, the float32 kernel; what runs without
MKL or without AMX/AVX512 16-bit instructions), ``16-bit GEMM`` (MKL's
``cblas_gemm_bf16bf16f32``/``cblas_gemm_f16f16f32`` on the 16-bit bits, probabilities rounded to
16 bits for the second product; forced here by the ``mkl`` provider, which MKL emulates on CPUs
without those instructions) and ``own tiles`` (the engine's own tile products: AMX, or VDPBF16PS
for bfloat16 on a CPU with AVX512-BF16; skipped where neither runs). Checked against the
``reference`` backend at the suite's tolerance model (16-bit unit roundoff), with NumPy float16
and ml_dtypes bfloat16 arrays and torch tensors, masks (boolean, and float masks in 16-bit or
float32), causal, GQA and a mod; and against FlashAttention's accuracy rule: the error against a
float64 computation from the same 16-bit values at most twice torch's own
CPU error in that dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import engine
from engine.backends.cpu import forward as cpu_forward
from engine.kernels.cpu.half import f32_to_bf16_array, f32_to_f16_array
from engine.runtime import gemm_providers as gp

from tolerances import assert_out_close, lse_atol, out_atol

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16]
PATHS = ["widened", "16-bit GEMM", "own tiles"]


def _own_tiles(dtype_name: str) -> str:
    """The engine's own tile product for this dtype here: "amx", "avx512-bf16" or ""."""
    return gp.sixteen_bit_tiles(dtype_name)[1]


@pytest.fixture
def path(request, monkeypatch):
    """Force one 16-bit path for the test (``numpy``: widened; ``mkl``: MKL's 16-bit GEMMs;
    ``own tiles``: the engine's own tile products, AMX or VDPBF16PS (``auto`` on a CPU with AMX
    or AVX512-BF16), skipped elsewhere; each such test checks that the path ran)."""
    if request.param == "own tiles":
        for var in (gp.ENV_VAR, "ATTENTION_ENGINE_AMX", "ATTENTION_ENGINE_AVX512_BF16"):
            monkeypatch.delenv(var, raising=False)
        engine.set_gemm_provider(None)
        if not _own_tiles("bfloat16"):
            pytest.skip("the engine's own tile products need AMX (that Linux lets this process use) or AVX512-BF16")
        yield request.param
        return
    name = "numpy" if request.param == "widened" else "mkl"
    got = gp.load_provider(name)
    if isinstance(got, str):
        pytest.skip(f"{request.param} path needs the {name} provider: {got}")
    engine.set_gemm_provider(name)
    for dt in ("bfloat16", "float16"):
        assert (gp.sixteen_bit_gemm(dt) is None) == (request.param == "widened")
    yield request.param
    engine.set_gemm_provider(None)


def _qkv(rng, dtype, Hq=2, H=2, L=140, S=301, E=32, Ev=24):
    return (
        rng.standard_normal((1, Hq, L, E)).astype(dtype),
        rng.standard_normal((1, H, S, E)).astype(dtype),
        rng.standard_normal((1, H, S, Ev)).astype(dtype),
    )


def _cases(rng, dtype, path="widened"):
    # the own tiles' path takes head widths that are multiples of 32 only (any L and S)
    shape = dict(E=64, Ev=32) if path == "own tiles" else {}
    q, k, v = _qkv(rng, dtype, **shape)
    L, S = q.shape[2], k.shape[2]
    fmask = (rng.standard_normal((L, S)) * 2).astype(np.float32)
    fmask[:, ::7] = -np.inf
    qg, kg, vg = _qkv(rng, dtype, Hq=4, H=2, **shape)
    from variants.softcap import tanh_softcap

    return [
        ("plain", q, k, v, {}),
        ("causal", q, k, v, {"is_causal": True}),
        ("bool mask", q, k, v, {"attn_mask": rng.random((L, S)) > 0.4}),
        ("16-bit float mask", q, k, v, {"attn_mask": fmask.astype(dtype)}),
        ("float32 mask", q, k, v, {"attn_mask": fmask}),
        ("gqa", qg, kg, vg, {"enable_gqa": True}),
        ("score_mod", q, k, v, {"score_mod": tanh_softcap, "mod_args": (np.float32(2.0),)}),
    ]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_16bit_matches_reference(dtype, path, rng, monkeypatch):
    amx = _count_amx(monkeypatch, path, dtype)
    for name, q, k, v, kw in _cases(rng, dtype, path):
        out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
        ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
        assert out.dtype == dtype and lse.dtype == dtype, (name, out.dtype, lse.dtype)
        mask = kw.get("attn_mask")
        assert_out_close(out, ref, out_atol(dtype, q, k, v, None, mask), f"{dtype} {name} out")
        assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, None, mask), f"{dtype} {name} lse")
    assert amx() in (0, len(_cases(rng, dtype, path))) and (amx() > 0) == (path == "own tiles")


@pytest.mark.parametrize("path", ["own tiles"], indirect=True)
@pytest.mark.parametrize("L, S", [(17, 1), (5, 3), (31, 33), (33, 31), (64, 97), (97, 64), (300, 257)])
def test_own_tiles_take_any_length(L, S, path, rng, monkeypatch):
    """L and S that are not multiples of the tile products' 32: a partial tile is multiplied at 32
    (zero keys past S, spare query columns) and cut; causal top left and bottom right, GQA and a
    batch of two. (Up to 8 query rows per key head with L <= S run
    on the decode op instead: tests/forward/test_decode_route.py.)"""
    amx = _count_amx(monkeypatch, path, BF16)
    q, k, v = (x.astype(BF16) for x in _qkv(rng, np.float32, Hq=4, H=2, L=L, S=S, E=64, Ev=32))
    q2, k2, v2 = (np.concatenate([x, x[:, ::-1]]) for x in (q, k, v))
    cases = [({}, q, k, v), ({"is_causal": True}, q, k, v), ({"is_causal": True}, q2, k2, v2)]
    if L <= S:  # (bottom right with L > S hides every key of the first rows: also covered)
        cases.append(({"attn_mask": engine.causal_lower_right(L, S)}, q, k, v))
    for kw, a, b, c in cases:
        out, lse = engine.scaled_dot_product_attention(a, b, c, backend="cpu", return_lse=True, enable_gqa=True, **kw)
        ref, ref_lse = engine.scaled_dot_product_attention(
            a, b, c, backend="reference", return_lse=True, enable_gqa=True, **kw
        )
        assert_out_close(out, ref, out_atol(BF16, a, b, c, None), f"L={L} S={S} {kw}")
        assert_out_close(lse, ref_lse, lse_atol(BF16, a, b, None), f"L={L} S={S} {kw} lse")
    assert amx() == len(cases)


@pytest.mark.parametrize("path", ["own tiles"], indirect=True)
@pytest.mark.parametrize("E, Ev", [(80, 80), (112, 48), (40, 96), (8, 8)])
def test_own_tiles_take_any_head_width(E, Ev, path, rng, monkeypatch):
    """Head widths that are not multiples of the tile products' 32 (Phi-2's 80): zero features
    padded to 32 (the same scores), the output's extra columns cut; with a score_mod and causal,
    GQA, and odd lengths."""
    amx = _count_amx(monkeypatch, path, BF16)
    q, k, v = (x.astype(BF16) for x in _qkv(rng, np.float32, Hq=4, H=2, L=70, S=95, E=E, Ev=Ev))
    bias = rng.standard_normal(4).astype(np.float32)
    cases = [{}, {"is_causal": True}, {"score_mod": _head_bias, "mod_args": (bias,)}]
    for kw in cases:
        out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, enable_gqa=True, **kw)
        ref, ref_lse = engine.scaled_dot_product_attention(
            q, k, v, backend="reference", return_lse=True, enable_gqa=True, **kw
        )
        assert out.shape == ref.shape and out.flags.c_contiguous
        assert_out_close(out, ref, out_atol(BF16, q, k, v, None), f"E={E} Ev={Ev} {kw}")
        assert_out_close(lse, ref_lse, lse_atol(BF16, q, k, None), f"E={E} Ev={Ev} {kw} lse")
    assert amx() == len(cases)


def _head_bias(score, b, h, q_idx, kv_idx, bias):
    return score + bias[h]


def _count_amx(monkeypatch, path, dtype):
    """A function giving how many calls took the own tiles' path since (skips such a test for a
    dtype whose instruction this CPU lacks: AMX-FP16 is newer than AMX-BF16, AVX512-BF16 has no
    float16 counterpart)."""
    if path == "own tiles" and not _own_tiles(np.dtype(dtype).name):
        pytest.skip(f"no tile instruction of the engine's for {np.dtype(dtype).name} here")
    calls = []
    real = cpu_forward.amx_operands
    monkeypatch.setattr(cpu_forward, "amx_operands", lambda k, v: calls.append(1) or real(k, v))
    return lambda: len(calls)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_16bit_tensors(dtype, path, rng):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    shape = dict(L=128, S=320, E=64, Ev=32) if path == "own tiles" else {}
    q, k, v = (torch.from_numpy(a).to(tdt) for a in _qkv(rng, np.float32, **shape))
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu", is_causal=True)
    ref = engine.scaled_dot_product_attention(q, k, v, backend="reference", is_causal=True)
    assert out.dtype == ref.dtype == (BF16 if dtype == "bfloat16" else np.float16)
    qn, kn, vn = (x.float().numpy() for x in (q, k, v))
    assert_out_close(out, ref, out_atol(out.dtype, qn, kn, vn, None), f"torch {dtype}")


def _flash_rule_cases(rng, dtype):
    L = S = 256
    q, k, v = _qkv(rng, np.float32, L=L, S=S, E=64, Ev=64)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    fmask = rng.standard_normal((L, S)).astype(dtype)
    return [
        ("plain", q, k, v, {}),
        ("causal", q, k, v, {"is_causal": True}),
        ("bool mask", q, k, v, {"attn_mask": rng.random((L, S)) > 0.5}),
        ("float mask", q, k, v, {"attn_mask": fmask}),
    ]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_attention_accuracy_rule_against_torch(dtype, path, rng, monkeypatch):
    """max |engine - exact| <= 2 * max |torch - exact|, exact = float64 from the 16-bit values."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    np_dt = BF16 if dtype == "bfloat16" else np.dtype(np.float16)
    amx = _count_amx(monkeypatch, path, np_dt)
    for name, q, k, v, kw in _flash_rule_cases(rng, np_dt):
        exact = engine.scaled_dot_product_attention(
            *(x.astype(np.float64) for x in (q, k, v)),
            backend="reference",
            **{
                key: (val.astype(np.float64) if key == "attn_mask" and val.dtype != bool else val)
                for key, val in kw.items()
            },
        )
        ours = engine.scaled_dot_product_attention(q, k, v, backend="cpu", **kw).astype(np.float64)
        tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype)) for x in (q, k, v))
        tkw = dict(kw)
        if "attn_mask" in kw:
            m = kw["attn_mask"]
            tkw["attn_mask"] = (
                torch.from_numpy(m)
                if m.dtype == bool
                else torch.from_numpy(m.astype(np.float32)).to(getattr(torch, dtype))
            )
        with torch.no_grad():
            theirs = F.scaled_dot_product_attention(tq, tk, tv, **tkw).float().numpy().astype(np.float64)
        err, torch_err = np.abs(ours - exact).max(), np.abs(theirs - exact).max()
        assert err <= 2 * torch_err, f"{dtype} {path} {name}: engine error {err:.3g} > 2 x torch's {torch_err:.3g}"
    assert (amx() > 0) == (path == "own tiles")


def test_16bit_path_with_a_nonfinite_value_matches_reference(rng):
    """An inf in v: the 16-bit GEMM path hands the call to the widened one (exact handling)."""
    if isinstance(gp.load_provider("mkl"), str):
        pytest.skip("needs the mkl provider")
    engine.set_gemm_provider("mkl")
    try:
        q, k, v = _qkv(rng, BF16)
        v[0, 1, 7, 3] = np.inf
        out = engine.scaled_dot_product_attention(q, k, v, backend="cpu", is_causal=True)
        ref = engine.scaled_dot_product_attention(q, k, v, backend="reference", is_causal=True)
        assert_out_close(out, ref, out_atol(BF16, q, k, np.where(np.isfinite(v.astype(np.float32)), v, 0), None))
    finally:
        engine.set_gemm_provider(None)


def test_16bit_gemm_path_follows_cpu_flags(monkeypatch):
    """auto: MKL's 16-bit GEMM only where the CPU has AMX / AVX512 16-bit instructions."""
    if isinstance(gp.load_provider("mkl"), str):
        pytest.skip("needs the mkl provider")
    monkeypatch.delenv(gp.ENV_VAR, raising=False)
    engine.set_gemm_provider(None)
    monkeypatch.setattr(gp, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert gp.sixteen_bit_gemm("bfloat16") is None and gp.sixteen_bit_gemm("float16") is None
    monkeypatch.setattr(gp, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    assert gp.sixteen_bit_gemm("bfloat16").name == "mkl" and gp.sixteen_bit_gemm("float16") is None
    monkeypatch.setattr(gp, "cpu_flags", lambda: frozenset({"avx512f", "avx512_fp16"}))
    assert gp.sixteen_bit_gemm("float16").name == "mkl"
    monkeypatch.setenv(gp.ENV_VAR, "numpy")  # another provider forced: widened
    assert gp.sixteen_bit_gemm("float16") is None


def _float32_classes(rng):
    """Random bit patterns over every exponent, and the values rounding gets wrong most easily."""
    random = rng.integers(0, 1 << 32, size=100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            1e-40,
            -1e-45,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            65504.0,
            65519.99,
            65520.0,
            3.4e38,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            1.0 + 2**-11,
            1.0 + 3 * 2**-11,
        ],
        dtype=np.float32,
    )
    return np.concatenate([special, random])


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_kernel_rounding_to_16_bits_matches_numpy(fmt, rng):
    """The kernel's float32 -> 16-bit rounding (ties to even, subnormals, overflow to inf, NaN
    kept) bit for bit as ml_dtypes / NumPy."""
    x = _float32_classes(rng)
    got = np.empty(x.size, np.uint16)
    (f32_to_bf16_array if fmt == "bfloat16" else f32_to_f16_array)(x, got)
    with np.errstate(all="ignore"):
        want = x.astype(BF16 if fmt == "bfloat16" else np.float16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan].view(np.uint16))
    assert np.all(np.isnan(got[nan].view(want.dtype).astype(np.float32)))


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_wrapper_widen_and_narrow_are_exact(fmt, rng):
    """The cpu wrapper's array conversions: every 16-bit pattern widens to exactly NumPy's float32
    (NaN payloads aside), and float32 narrows bit for bit as NumPy / ml_dtypes round."""
    from engine.backends.cpu.operands import narrow as _narrow
    from engine.backends.cpu.operands import widen as _widen

    dt = BF16 if fmt == "bfloat16" else np.dtype(np.float16)
    every = np.arange(1 << 16, dtype=np.uint16).view(dt)
    got, want = _widen(every), every.astype(np.float32)
    nan = np.isnan(want)
    assert got.dtype == np.float32 and np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.all(np.isnan(got[nan]))
    x = _float32_classes(rng).reshape(-1, 1)
    with np.errstate(all="ignore"):
        want = x.astype(dt)
    got = _narrow(x, dt)
    nan = np.isnan(x)
    assert got.dtype == dt and np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_hot_rows_give_the_value_row_exactly(dtype, path, rng, monkeypatch):
    """Scores so large that each row's softmax is one-hot: the output is that key's value row, bit
    for bit, as torch's and the reference's. (The 16-bit GEMM paths were a 16-bit step off on a
    quarter of the rows: the largest weight's exponent, scale folded in, was not exactly 0 at such
    magnitudes, and the second product read it rounded while the row's sum did not; found by a
    trial.)"""
    amx = _count_amx(monkeypatch, path, dtype)
    scale = 1000.0 if dtype == BF16 else 100.0  # float16 scores overflow beyond
    q = (rng.standard_normal((1, 1, 64, 64)) * scale).astype(dtype)
    k = (rng.standard_normal((1, 1, 64, 64)) * scale).astype(dtype)
    v = rng.standard_normal((1, 1, 64, 64)).astype(dtype)
    s = q[0, 0].astype(np.float64) @ k[0, 0].astype(np.float64).T / 8
    top2 = np.sort(s, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 50)  # one-hot in float64 already
    out = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    np.testing.assert_array_equal(out[0, 0], v[0, 0][s.argmax(axis=1)])
    assert (amx() > 0) == (path == "own tiles")
