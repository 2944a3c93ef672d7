"""The ``cpu`` backend's flash kernel against the ``reference`` backend, on every path its
specialisations create: no mask, boolean and float masks (broadcast), causal tiles on and off the
diagonal with L < S, L > S and sizes around the tile edges, GQA, E != Ev, fully masked rows, NaN
rows, return_lse and non-contiguous inputs."""

import numpy as np
import pytest

import engine
from engine.backends.cpu.blas_pin import get_blas_pin
from engine.backends.cpu.tiles import tile_sizes
from engine.runtime.config import CPU_BLOCK_Q as BLOCK_Q
from engine.runtime.config import CPU_TASK_ROWS as TASK_ROWS

from tolerances import assert_out_close, lse_atol, out_atol

DTYPES = [np.float32, np.float64]


def _check(q, k, v, dtype, **kw):
    """cpu against the float64 reference, at the suite's tolerance model (units of roundoff times
    the size of the scores and of v), not a fixed tolerance: a fixed 1e-5 let an exp 240 times
    less accurate than its contract pass."""
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    ref, ref_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    mask = kw.get("attn_mask")
    assert_out_close(out, ref, out_atol(dtype, q, k, v, kw.get("scale"), mask), what="cpu out")
    assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, kw.get("scale"), mask), what="cpu lse")
    return out, lse


def _qkv(rng, dtype, B=1, Hq=2, H=None, L=37, S=53, E=16, Ev=None):
    H = Hq if H is None else H
    Ev = E if Ev is None else Ev
    q = rng.standard_normal((B, Hq, L, E)).astype(dtype)
    k = rng.standard_normal((B, H, S, E)).astype(dtype)
    v = rng.standard_normal((B, H, S, Ev)).astype(dtype)
    return q, k, v


def _edge_sizes(E):
    """Lengths around one query tile, one task (TASK_ROWS rows) and one key tile, as run here."""
    bq, bk = tile_sizes(1 << 20, E, E, blas_pinned=get_blas_pin().available)
    return sorted({1, bq - 1, bq, bq + 1, TASK_ROWS - 1, TASK_ROWS + 1, bk - 1, bk + 1, 2 * bk + 3})


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_mask_tile_edges(rng, dtype):
    for L in (1, BLOCK_Q, TASK_ROWS + 1):
        for S in _edge_sizes(16)[::2]:
            _check(*_qkv(rng, dtype, L=L, S=S), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", [(300, 300), (300, 70), (70, 300), (257, 129), (129, 257), (1, 5), (5, 1)])
def test_causal_diagonal_tiles(rng, dtype, L, S):
    _check(*_qkv(rng, dtype, L=L, S=S), dtype, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mshape", [(1, 2, 40, 90), (40, 90), (90,), (1, 1, 90), (2, 1, 40, 1), (2, 2, 40, 90)])
def test_bool_mask_broadcast(rng, dtype, mshape):
    q, k, v = _qkv(rng, dtype, B=2, L=40, S=90)
    mask = rng.random(mshape) > 0.3
    _check(q, k, v, dtype, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
# (2, 1, 40, 90): a different mask per batch entry (a row-constant one, as (2, 1, 40, 1), cannot
# show a batch mix-up: softmax ignores a constant added to a row)
@pytest.mark.parametrize("mshape", [(1, 2, 40, 90), (40, 90), (90,), (2, 1, 40, 1), (2, 1, 40, 90)])
def test_float_mask_broadcast(rng, dtype, mshape):
    q, k, v = _qkv(rng, dtype, B=2, L=40, S=90)
    mask = rng.standard_normal(mshape).astype(dtype) * 3
    mask[..., ::7] = -np.inf  # masked columns through the float path
    _check(q, k, v, dtype, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros_and_minus_inf(rng, dtype, kind):
    q, k, v = _qkv(rng, dtype, L=300, S=300)  # rows in several tasks and key tiles
    allowed = rng.random((300, 300)) > 0.5
    allowed[[0, 63, 64, 255, 299]] = False
    mask = allowed if kind == "bool" else np.where(allowed, 0.0, -np.inf).astype(dtype)
    out, lse = _check(q, k, v, dtype, attn_mask=mask)
    assert np.all(out[:, :, [0, 63, 64, 255, 299]] == 0.0)
    assert np.all(lse[:, :, [0, 63, 64, 255, 299]] == -np.inf)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_masked_only_in_later_key_tiles(rng, dtype):
    """A row whose visible keys all lie in the last key tile (running max -inf until then)."""
    q, k, v = _qkv(rng, dtype, L=20, S=600)
    allowed = np.zeros((20, 600), dtype=bool)
    allowed[:, -3:] = True
    allowed[5, 0] = True  # one key in the first tile, then far later ones
    _check(q, k, v, dtype, attn_mask=allowed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_and_e_ne_ev(rng, dtype):
    q, k, v = _qkv(rng, dtype, B=2, Hq=6, H=2, L=70, S=130, E=24, Ev=40)
    _check(q, k, v, dtype, enable_gqa=True)
    _check(q, k, v, dtype, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [64, 128])
def test_head_sizes_of_the_benchmarks(rng, dtype, E):
    _check(*_qkv(rng, dtype, L=200, S=300, E=E), dtype)
    _check(*_qkv(rng, dtype, L=300, S=200, E=E), dtype, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_scores_stay_stable(rng, dtype):
    q, k, v = _qkv(rng, dtype, L=90, S=200)
    # scores in the tens (float32) or hundreds: e^score overflows unless the online rescaling
    # works. float32 stays at tens because the scores' own rounding error grows with their size.
    f = 4 if dtype == np.float32 else 30
    _check(q * f, k * f, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_query_row_gives_nan_row(rng, dtype):
    q, k, v = _qkv(rng, dtype, L=70, S=90)
    q[0, 1, 65] = np.nan
    out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True)
    assert np.isnan(out[0, 1, 65]).all() and np.isnan(lse[0, 1, 65])
    clean = np.ones(out.shape[:-1], dtype=bool)
    clean[0, 1, 65] = False
    assert np.isfinite(out[clean]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(rng, dtype):
    base_q = rng.standard_normal((1, 40, 3, 32)).astype(dtype)
    q = base_q.transpose(0, 2, 1, 3)[:, :, :, ::2]  # (1, 3, 40, 16), strided
    k = rng.standard_normal((1, 3, 16, 150)).astype(dtype).transpose(0, 1, 3, 2)  # (1, 3, 150, 16)
    v = np.asfortranarray(rng.standard_normal((1, 3, 150, 24)).astype(dtype))
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    _check(q, k, v, dtype)
    _check(q, k, v, dtype, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_and_extra_leading_dims(rng, dtype):
    _check(*(rng.standard_normal((33, 8)).astype(dtype) for _ in range(3)), dtype)
    q = rng.standard_normal((2, 3, 2, 20, 8)).astype(dtype)
    k = rng.standard_normal((2, 3, 2, 30, 8)).astype(dtype)
    _check(q, k, k.copy(), dtype, attn_mask=rng.random((3, 1, 20, 30)) > 0.2)


def test_blas_pin_restores_thread_count(rng):
    pin = get_blas_pin()
    if not pin.available:
        pytest.skip("OpenBLAS thread setter not found: tiles stay under the threshold instead")
    before = pin._get()
    with pin():
        assert pin._get() == 1
        with pin():  # nested / concurrent users: still 1, restored only by the last
            assert pin._get() == 1
        assert pin._get() == 1
    assert pin._get() == before
    _check(*_qkv(rng, np.float32, L=300, S=600, E=64), np.float32)
    assert pin._get() == before


def test_tile_sizes_keep_blas_single_threaded():
    for E, Ev in [(1, 1), (16, 16), (64, 64), (128, 128), (64, 256), (256, 64), (512, 512), (16384, 8)]:
        for L in (1, 7, 4096):
            bq, bk = tile_sizes(L, E, Ev, blas_pinned=False)
            assert bk % 16 == 0 and 16 <= bk <= 256 and 1 <= bq <= max(L, 1)
            assert bq * bk * max(E, Ev) <= 65536 * 4, (L, E, Ev, bq, bk)


def test_wide_heads_use_smaller_query_tiles(rng):
    q, k, v = _qkv(rng, np.float32, Hq=1, L=70, S=40, E=600, Ev=3)
    assert tile_sizes(70, 600, 3, blas_pinned=False)[0] < BLOCK_Q
    _check(q, k, v, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rise", [1e-4, 1e-6])
def test_running_max_that_rises_slightly_in_a_later_key_tile_is_rescaled(dtype, rise):
    """Every key of the first key tile scores m; in the second tile one key scores m + rise. The
    accumulator of the first tile must be rescaled by exp(-rise): skipping that rescale for small
    moves (an optimisation that looks harmless) is off by about rise * |v|, which the tolerance
    model (a few units of float32 roundoff) catches for rise = 1e-4."""
    bq, bk = tile_sizes(1 << 20, 16, 16, blas_pinned=get_blas_pin().available)
    L, S, m = 3, 2 * bk, 4.0
    q = np.zeros((1, 1, L, 16), dtype)
    q[..., 0] = 1.0
    k = np.zeros((1, 1, S, 16), dtype)
    k[..., :bk, 0] = m
    k[..., bk:, 0] = m - 6.0
    k[..., bk, 0] = m + rise
    v = np.random.default_rng(9).standard_normal((1, 1, S, 16)).astype(dtype)
    v[..., :bk, :] += 1.0  # the early tile's values differ from the late key's
    out, _ = _check(q, k, v, dtype, scale=1.0)
    assert np.isfinite(out).all()
