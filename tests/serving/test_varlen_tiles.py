"""The ``cpu`` packed-batch forward on the dense forward's tiles (``kernels.cpu.varlen_flash``) with
tiles small enough that every sequence spans many of them (8 x 16, two query tiles per task,
strips of 3 rows on the diagonal):
causal and window edges inside and across tiles, rows that see nothing, NaN and inf inputs, and
the backward recomputing the forward's scores tile by tile (``varlen_bwd``)."""

import numpy as np
import pytest

import engine
import engine.backends.cpu.tiles as cpu_tiles

from tolerances import assert_out_close, lse_atol, out_atol


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(cpu_tiles, "CPU_BIG_BLOCK_Q", 8)
    monkeypatch.setattr(cpu_tiles, "CPU_BLOCK_K", 16)
    monkeypatch.setattr(cpu_tiles, "CPU_TASK_ROWS", 16)
    monkeypatch.setattr(cpu_tiles, "CPU_VARLEN_TASK_ROWS", 16)
    monkeypatch.setattr(cpu_tiles, "CPU_DIAGONAL_STRIP", 3)  # diagonal tiles in strips, one partial


def _case(rng, lens_q, lens_k, Hq=4, H=2, E=16, dtype=np.float32):
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    return dict(
        query=rng.standard_normal((cq[-1], Hq, E)).astype(dtype),
        key=rng.standard_normal((ck[-1], H, E)).astype(dtype),
        value=rng.standard_normal((ck[-1], H, E)).astype(dtype),
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
    )


# sequences over many 8 x 16 tiles: longer and shorter keys than queries, empty ones, one row
LENS = ([37, 0, 50, 1, 23, 64], [37, 5, 90, 1, 9, 64])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, (13, None)), (False, (7, 3))])
def test_many_tiles_match_the_reference(small_tiles, rng, dtype, causal, window):
    case = _case(rng, *LENS, dtype=dtype)
    kw = dict(is_causal=causal, window=window, return_lse=True)
    out, lse = engine.varlen_attention(**case, **kw, backend="cpu")
    ref, ref_lse = engine.varlen_attention(**case, **kw, backend="reference")
    q, k, v = (case[n] for n in ("query", "key", "value"))
    assert_out_close(out, ref, out_atol(dtype, q, k, v, None), what="out")
    assert_out_close(lse, ref_lse, lse_atol(dtype, q, k, None), what="lse")


def test_nonfinite_inputs_reach_only_their_rows(small_tiles, rng):
    """A NaN query row makes only its row NaN; an inf value reaches only the rows that weigh it
    (causal: rows before the key do not), as the reference."""
    case = _case(rng, [30, 40], [30, 40])
    case["query"][35, 1, 3] = np.nan  # sequence 1, row 5
    case["value"][30 + 20, 0, 2] = np.inf  # sequence 1, key 20: rows 20 and later see it
    out = engine.varlen_attention(**case, is_causal=True, backend="cpu")
    ref = engine.varlen_attention(**case, is_causal=True, backend="reference")
    assert np.array_equal(np.isnan(out), np.isnan(ref)) and np.array_equal(np.isinf(out), np.isinf(ref))
    assert np.isfinite(out[30:50, 0]).all() and np.isnan(out[35, 1]).all()
    ok = np.isfinite(ref)
    assert np.allclose(out[ok], ref[ok], atol=1e-5)


@pytest.mark.parametrize("causal, window", [(True, None), (False, (7, 3))])
def test_backward_recomputes_the_forward_tiles(small_tiles, rng, causal, window):
    """float32 gradients from the cpu forward's out and lse: the backward recomputes each score
    with the product and arithmetic of the forward's tile, so its weights agree with that lse."""
    case = _case(rng, *LENS)
    kw = dict(is_causal=causal, window=window)
    out, lse = engine.varlen_attention(**case, **kw, return_lse=True, backend="cpu")
    g = rng.standard_normal(out.shape).astype(np.float32)
    got = engine.varlen_attention_backward(g, **case, out=out, lse=lse, **kw, backend="cpu")
    f64 = {n: (x.astype(np.float64) if x.dtype.kind == "f" else x) for n, x in case.items()}
    want = engine.varlen_attention_backward(
        g.astype(np.float64), **f64, out=out.astype(np.float64), lse=lse.astype(np.float64), **kw, backend="reference"
    )
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, float(np.abs(b).max())), err_msg=name)


def test_diagonal_split_skips_only_hidden_keys():
    """A tile that the causal (or right-window) diagonal crosses computes the keys its first row
    sees (3 or more) for the whole tile and the rest in strips; other tiles and short ones in one
    product."""
    from engine.kernels.cpu.varlen_rows import diagonal_split

    split = diagonal_split.py_func
    # (rows i0..i1, key tile j0..j1, off, S, causal, left, right, strip) -> (d, e)
    assert split(0, 8, 0, 16, 0, 40, True, -1, -1, 3) == (0, 8)  # row 0 sees key 0 (< 3): all in strips
    assert split(8, 16, 0, 16, 0, 40, True, -1, -1, 3) == (9, 16)
    assert split(16, 24, 0, 16, 0, 40, True, -1, -1, 3) == (16, 16)  # below the diagonal: one product
    assert split(0, 8, 0, 16, 0, 40, True, -1, -1, 8) == (8, 8)  # strips as tall as the tile
    assert split(0, 8, 0, 16, 5, 45, True, -1, -1, 3) == (6, 13)  # bottom-right: row i is at 5 + i
    assert split(0, 8, 0, 16, 0, 40, False, -1, 2, 3) == (3, 10)  # right window of 2
    assert split(0, 8, 0, 16, 0, 40, False, 4, -1, 3) == (16, 16)  # a left window alone: no diagonal


def test_rows_per_task_do_not_change_the_results(small_tiles, monkeypatch, rng):
    """Tasks of 2 or 8 query tiles (``CPU_VARLEN_TASK_ROWS``): the same bits (each row's products
    and softmax steps are its tiles', whichever task runs them)."""
    case = _case(rng, *LENS)
    two = engine.varlen_attention(**case, is_causal=True, return_lse=True, backend="cpu")
    monkeypatch.setattr(cpu_tiles, "CPU_VARLEN_TASK_ROWS", 64)
    eight = engine.varlen_attention(**case, is_causal=True, return_lse=True, backend="cpu")
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(two, eight))


def test_varlen_task_rows_keep_every_thread_busy():
    plan = cpu_tiles.TilePlan(128, 256, 2, False)
    lens = np.linspace(1, 512, 16).astype(np.int64)
    assert cpu_tiles.varlen_sub_tiles(plan, lens, 8, 2, 64) == 4  # 512 rows: 128 tasks
    assert cpu_tiles.varlen_sub_tiles(plan, lens, 8, 2, 128) == 2  # wider heads: 256 rows, the plan's
    assert cpu_tiles.varlen_sub_tiles(plan, np.array([512]), 2, 2, 64) == 2  # 2 tasks < 4 per thread: the plan's
    assert cpu_tiles.varlen_sub_tiles(plan, np.array([4096]), 1, 2, 32) == 4  # 8 tasks of 512 rows
    assert cpu_tiles.varlen_sub_tiles(cpu_tiles.TilePlan(64, 256, 8, False), lens, 8, 2, 64) == 8
