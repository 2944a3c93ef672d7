"""The ``cpu`` forward's AMX path (``engine.kernels.cpu.amx``) and its VDPBF16PS twin
(``engine.kernels.cpu.avx512_bf16``, the same contract and operands): the tile product against
NumPy, the operands the kernel lays out for it, and the forward through it against the
``reference`` backend where its layout choices matter (a key array whose rows do not start cache
lines, read-only inputs, NaN values, sizes it does not take, the switches that turn it off).

The tile products and the forward through them need a CPU with AMX that Linux lets this process
use (Intel Xeon from Sapphire Rapids on; AMX-FP16 for float16 from Granite Rapids on), or for
bfloat16 one with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake): elsewhere those tests are skipped,
and the operands' layout is still tested (it is plain Numba code).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import njit

import engine
from engine.backends.cpu import forward as cpu_forward
from engine.backends.cpu.operands import _aligned_empty
from engine.kernels.cpu.amx import amx_call, amx_gemm, amx_ready, operands_head
from engine.kernels.cpu.avx512_bf16 import bf16_dot_gemm, bf16_dot_ready
from engine.runtime import gemm_providers as gp

from tolerances import assert_out_close, lse_atol, out_atol

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


#: the engine's own tile products, by name (the forward takes AMX first)
GEMMS = {"amx": amx_gemm, "avx512-bf16": bf16_dot_gemm}


def _need(dtype):
    """Skip unless the forward takes one of the engine's own tile products for ``dtype`` here."""
    if not gp.sixteen_bit_tiles(np.dtype(dtype).name)[0]:
        pytest.skip(f"no AMX or AVX512-BF16 for {np.dtype(dtype).name} on this CPU (or Linux does not grant AMX)")


@njit
def _gemm(fn, a, b, c, M, N, K, accumulate):
    amx_call(
        fn, a.ctypes.data, a.strides[0], b.ctypes.data, b.strides[0], c.ctypes.data, c.strides[0], M, N, K, accumulate
    )
    amx_call(fn, 0, 0, 0, 0, 0, 0, 0, 0, 0, False)  # M = 0: release the tiles


def _aligned(x):
    out = _aligned_empty(x.shape, x.dtype)
    out[...] = x
    return out


@pytest.mark.parametrize("gemm", list(GEMMS))
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("M, N, K", [(32, 32, 32), (64, 96, 128), (256, 64, 64)])
def test_amx_gemm_matches_numpy(gemm, dtype, M, N, K, rng):
    """C = A @ B and C += A @ B with B in the pair layout, against float64 products of the same
    16-bit values (both sum in float32: the error is float32 rounding of K terms)."""
    fn = GEMMS[gemm](dtype.name)
    if not fn:
        pytest.skip(f"no {gemm} product for {dtype.name} here")
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    pairs = np.empty((K // 2, N, 2), dtype)
    pairs[:, :, 0], pairs[:, :, 1] = b[0::2], b[1::2]
    a16, b32 = _aligned(a.view(np.uint16)), _aligned(pairs.view(np.uint16).reshape(K // 2, 2 * N).view(np.uint32))
    c = _aligned(np.full((M, N), np.nan, np.float32))  # overwritten, not added to
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tol = 4 * K * np.finfo(np.float32).eps * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    _gemm(fn, a16, b32, c, M, N, K, False)
    assert np.all(np.abs(c - exact) <= tol)
    _gemm(fn, a16, b32, c, M, N, K, True)
    assert np.all(np.abs(c - 2 * exact) <= 2 * tol)


def test_amx_gemm_is_zero_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setenv("ATTENTION_ENGINE_AMX", "0")
    assert amx_gemm("bfloat16") == 0 and amx_gemm("float16") == 0
    assert not amx_ready("float32")
    assert bf16_dot_gemm("float16") == 0 and bf16_dot_gemm("float32") == 0  # bfloat16 only
    monkeypatch.setenv("ATTENTION_ENGINE_AVX512_BF16", "0")
    assert not bf16_dot_ready() and bf16_dot_gemm("bfloat16") == 0
    assert gp.sixteen_bit_tiles("bfloat16") == (0, "")


@njit
def _lay_out(k, v, k_out, vt_out):
    for bh in range(v.shape[0] * v.shape[1]):
        operands_head(k, v, k_out, vt_out, bh)


@pytest.mark.parametrize("S", [1, 2, 32, 70, 71, 96])
def test_operands_transpose_values_and_copy_keys(S, rng):
    """v.T per head (two rows at a time, 16 pairs per sweep, and the tail), k copied only where a
    buffer is given, both zero from S to a multiple of 32 (stale bits there first): plain Numba, so
    on every CPU."""
    Sp = -(-S // 32) * 32
    k = rng.integers(0, 1 << 16, (2, 3, S, 64), dtype=np.uint16)
    v = rng.integers(0, 1 << 16, (2, 3, S, 32), dtype=np.uint16)
    want_vt = np.zeros((2, 3, 32, Sp), np.uint16)
    want_vt[..., :S] = np.swapaxes(v, 2, 3)
    want_k = np.zeros((2, 3, Sp, 64), np.uint16)
    want_k[:, :, :S] = k
    vt = np.full((2, 3, 32, Sp), 0xFFFF, np.uint16)
    k_out = np.full((2, 3, Sp, 64), 0xFFFF, np.uint16)
    _lay_out(k, v, k_out, vt)
    np.testing.assert_array_equal(vt, want_vt)
    np.testing.assert_array_equal(k_out, want_k)
    vt[:] = 0xFFFF
    _lay_out(k, v, np.empty((0, 0, 0, 0), np.uint16), vt)
    np.testing.assert_array_equal(vt, want_vt)


def _spy(monkeypatch):
    """The (k_amx, vt_amx) buffers of each call that took the AMX path."""
    calls = []
    real = cpu_forward.amx_operands

    def spy(k, v):
        got = real(k, v)
        calls.append(got)
        return got

    monkeypatch.setattr(cpu_forward, "amx_operands", spy)
    return calls


def _check(q, k, v, **kw):
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    assert_out_close(out, ref, out_atol(q.dtype, q, k, v, None, kw.get("attn_mask")))
    assert_out_close(lse, ref_lse, lse_atol(q.dtype, q, k, None, kw.get("attn_mask")), "lse")


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["k on cache lines", "k off cache lines"])
def test_forward_through_amx_with_keys_on_and_off_cache_lines(dtype, offset, rng, monkeypatch):
    """A key array starting a cache line is read as it is; one that does not is copied first
    (k_amx non-empty). Both against the reference, with causal, GQA and a mask."""
    _need(dtype)
    engine.set_gemm_provider(None)
    calls = _spy(monkeypatch)
    q = rng.standard_normal((2, 4, 96, 64)).astype(dtype)
    raw = _aligned_empty((2 * 2 * 160 * 64 + offset,), np.uint16)
    k = raw[offset:].view(dtype).reshape(2, 2, 160, 64)
    k[...] = rng.standard_normal(k.shape).astype(dtype)
    v = rng.standard_normal((2, 2, 160, 32)).astype(dtype)
    assert (k.ctypes.data % 64 == 0) == (offset == 0)
    _check(q, k, v, enable_gqa=True)
    _check(q, k, v, enable_gqa=True, is_causal=True)
    _check(q, k, v, enable_gqa=True, attn_mask=rng.random((96, 160)) > 0.3)
    assert len(calls) == 3
    assert all((got[0].size == 0) == (offset == 0) for got in calls)


def test_forward_through_amx_with_read_only_inputs_and_a_score_mod(rng, monkeypatch):
    _need(BF16)
    engine.set_gemm_provider(None)
    calls = _spy(monkeypatch)
    from variants.softcap import tanh_softcap

    q, k, v = (rng.standard_normal((1, 2, 64, 64)).astype(BF16) for _ in range(3))
    for a in (q, k, v):
        a.flags.writeable = False
    _check(q, k, v)
    _check(q, k, v, score_mod=tanh_softcap, mod_args=(np.float32(2.0),))
    assert len(calls) == 2


def test_a_nan_value_or_a_size_amx_does_not_take_goes_another_path(rng, monkeypatch):
    """A NaN in v: the widened path (exact NaN pattern: only the rows that weigh it); or
    ATTENTION_ENGINE_AMX=0: the other paths, same results (L and S of any size, and head widths
    that are not multiples of 32, padded with zero features, take this one)."""
    _need(BF16)
    engine.set_gemm_provider(None)
    calls = _spy(monkeypatch)
    q, k, v = (rng.standard_normal((1, 2, 64, 64)).astype(BF16) for _ in range(3))
    v[0, 1, 5, 3] = np.nan
    _check(q, k, v, is_causal=True)
    assert calls == []
    q2, k2, v2 = (rng.standard_normal((1, 2, 70, 48)).astype(BF16) for _ in range(3))
    _check(q2, k2, v2)  # E = Ev = 48: padded to 64
    _check(*(x[..., :32] for x in (q2, k2, v2)))  # L = S = 70, E = Ev = 32
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setenv("ATTENTION_ENGINE_AMX", "0")
    monkeypatch.setenv("ATTENTION_ENGINE_AVX512_BF16", "0")
    q3, k3, v3 = (rng.standard_normal((1, 2, 64, 64)).astype(BF16) for _ in range(3))
    _check(q3, k3, v3)
    assert calls == []
    monkeypatch.delenv("ATTENTION_ENGINE_AMX")
    monkeypatch.delenv("ATTENTION_ENGINE_AVX512_BF16")
    _check(q3, k3, v3)
    assert len(calls) == 1


def test_a_provider_named_keeps_the_amx_path_off(monkeypatch):
    monkeypatch.setenv(gp.ENV_VAR, "numpy")
    assert gp.sixteen_bit_amx("bfloat16") == 0
    assert gp.sixteen_bit_tiles("bfloat16") == (0, "")


def test_a_portable_numba_target_keeps_amx_off(monkeypatch):
    """NUMBA_CPU_NAME=generic (portable caches) compiles for a CPU without AMX: the path must not
    be taken (LLVM could not emit its instructions); NUMBA_CPU_FEATURES is read where set."""
    import numba

    from engine.kernels.cpu import amx

    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    amx._cpu_features.cache_clear()
    try:
        assert not amx.amx_ready("bfloat16") and amx.amx_gemm("bfloat16") == 0
        assert not bf16_dot_ready() and bf16_dot_gemm("bfloat16") == 0
        monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512f,-amx-tile,+amx-bf16")
        amx._cpu_features.cache_clear()
        assert not amx.amx_ready("bfloat16")  # no amx-tile
        monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx512f,+avx512bf16")
        amx._cpu_features.cache_clear()
        assert bf16_dot_ready() and not amx.amx_ready("bfloat16")
    finally:
        amx._cpu_features.cache_clear()


def test_mkl_tiles_are_measured_on_mkls_path(monkeypatch):
    """The tile measurement of MKL's 16-bit path must not time the AMX path, which the same call
    takes by default (autotune's timer passes ``amx=False``)."""
    _need(BF16)
    engine.set_gemm_provider(None)
    from engine.backends.cpu import autotune
    from engine.dispatch import select
    from engine.problems.attention import validate_attention_args

    calls = _spy(monkeypatch)
    x = np.zeros((1, 1, 32, 64), BF16)
    forward = select("cpu", validate_attention_args(x, x, x))[1].run
    autotune._timer(forward, BF16, 64, "short", amx=False)(64, 64, 64)
    assert calls == []
    autotune._timer(forward, BF16, 64, "short")(64, 64, 64)
    assert len(calls) == 1
