"""engine.distributed.scaled_dot_product_attention on a real LocalCluster (in-process workers, and
worker processes for what crosses a process: mods pickled by reference, each process's threads):
every case against one single-process call, the graph's structure (skipped pairs, boundary-only
masks, a merge tree fixed at build time), and bad chunking refused before any task runs."""

import os
import subprocess
import sys

import numpy as np
import pytest

import engine

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")
import dask  # noqa: E402

import engine.distributed as ed  # noqa: E402
from engine.distributed import tasks, visibility  # noqa: E402

from testmods import alibi_with_batch, window_by_batch_and_head  # noqa: E402

pytestmark = pytest.mark.xdist_group("dask")

#: the issue's targets: out and lse against the single-process cpu backend
ATOL = {np.float32: 1e-5, np.float64: 1e-10}


def _randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _check(client, got, expected, dtype, workers=None):
    out, lse = client.compute(list(got), sync=True, workers=workers)
    np.testing.assert_allclose(out, expected[0], rtol=0, atol=ATOL[dtype])
    np.testing.assert_allclose(lse, expected[1], rtol=0, atol=ATOL[dtype])
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == expected[0].shape and lse.shape == expected[1].shape


def _pair_keys(arr):
    """Keys and tasks of the pair layer of a result's graph."""
    graph = dict(arr.__dask_graph__())
    return {k: t for k, t in graph.items() if isinstance(k, tuple) and str(k[0]).startswith("attention-pair-")}


def _pair_info(task):
    return next(a for a in task if isinstance(a, tasks.PairInfo))


# -- results --------------------------------------------------------------------------------------
CASES = {
    # name: (shapes q, k, v; chunks q, k, v; dtype; kwargs)
    "uneven chunks everywhere": (
        (2, 3, 50, 8),
        (2, 3, 40, 8),
        (2, 3, 40, 6),
        ((1, 1), (2, 1), (17, 20, 13), 8),
        ((1, 1), (2, 1), (10, 7, 23), 8),
        ((1, 1), (2, 1), (10, 7, 23), 6),
        np.float32,
        {},
    ),
    "causal, uneven, L > S": (
        (1, 2, 45, 16),
        (1, 2, 30, 16),
        (1, 2, 30, 16),
        (1, 1, (9, 14, 22), 16),
        (1, 1, (11, 19), 16),
        (1, 1, (11, 19), 16),
        np.float64,
        {"is_causal": True},
    ),
    "causal, equal chunks": (
        (1, 2, 64, 8),
        (1, 2, 64, 8),
        (1, 2, 64, 8),
        (1, 2, 16, 8),
        (1, 2, 16, 8),
        (1, 2, 16, 8),
        np.float32,
        {"is_causal": True},
    ),
    "GQA, heads chunked": (
        (2, 6, 24, 8),
        (2, 3, 30, 8),
        (2, 3, 30, 8),
        (1, (4, 2), 12, 8),
        (1, (2, 1), 10, 8),
        (1, (2, 1), 10, 8),
        np.float64,
        {"enable_gqa": True},
    ),
    "batch broadcast (key batch 1)": (
        (3, 2, 20, 8),
        (1, 2, 25, 8),
        (1, 2, 25, 8),
        (2, 1, 7, 8),
        (1, 1, 9, 8),
        (1, 1, 9, 8),
        np.float32,
        {},
    ),
    "query heads broadcast (Hq = 1)": (
        (2, 1, 20, 8),
        (2, 4, 25, 8),
        (2, 4, 25, 8),
        (1, 1, 7, 8),
        (1, 3, 9, 8),
        (1, 3, 9, 8),
        np.float64,
        {},
    ),
    "scale given": (
        (1, 2, 20, 8),
        (1, 2, 20, 8),
        (1, 2, 20, 8),
        (1, 1, 6, 8),
        (1, 1, 6, 8),
        (1, 1, 6, 8),
        np.float32,
        {"scale": 0.3},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_one_cpu_call(dask_client, case):
    qs, ks, vs, qc, kc, vc, dtype, kw = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    q, k, v = _randn(rng, qs, dtype), _randn(rng, ks, dtype), _randn(rng, vs, dtype)
    got = ed.scaled_dot_product_attention(
        da.from_array(q, chunks=qc), da.from_array(k, chunks=kc), da.from_array(v, chunks=vc), return_lse=True, **kw
    )
    assert all(isinstance(x, da.Array) for x in got)
    expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **kw)
    _check(dask_client, got, expected, dtype)
    assert got[0].chunks[-2] == da.from_array(q, chunks=qc).chunks[-2]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_dask_chunked_like_the_scores_or_numpy(dask_client, kind):
    rng = np.random.default_rng(3)
    q, k, v = (_randn(rng, (2, 2, 30, 8), np.float32) for _ in range(3))
    if kind == "bool":
        mask = rng.random((2, 1, 30, 30)) < 0.7
        mask[0, 0, 5] = False  # a row that sees nothing: zeros and lse = -inf
    else:
        mask = _randn(rng, (2, 1, 30, 30), np.float32)
        mask[1, 0, 7] = -np.inf
    qd, kd, vd = (da.from_array(x, chunks=(1, 1, 8, 8)) for x in (q, k, v))
    # a dask mask chunked like the scores, the same as NumPy (chunked here), and an (L, S) one
    for m in (da.from_array(mask, chunks=(1, 1, 8, 8)), mask, mask[0, 0]):
        expected = engine.scaled_dot_product_attention(q, k, v, attn_mask=np.asarray(m), backend="cpu", return_lse=True)
        _check(
            dask_client, ed.scaled_dot_product_attention(qd, kd, vd, attn_mask=m, return_lse=True), expected, np.float32
        )


def test_mods_see_global_indices(dask_process_client):
    """score_mod and mask_mod get (b, h, q_idx, kv_idx) of the whole problem, whatever the chunk:
    batch, heads, queries and keys all chunked, unevenly; with causal too."""
    rng = np.random.default_rng(5)
    q, k, v = (_randn(rng, (2, 3, 37, 8), np.float64) for _ in range(3))
    slopes = np.array([0.1, 0.2, 0.3])
    chunks = (1, (2, 1), (10, 15, 12), 8)
    qd, kd, vd = (da.from_array(x, chunks=chunks) for x in (q, k, v))
    kw = dict(score_mod=alibi_with_batch, mask_mod=window_by_batch_and_head, mod_args=(slopes,), is_causal=True)
    got = ed.scaled_dot_product_attention(qd, kd, vd, return_lse=True, **kw)
    # the reference backend evaluates the mods in Python: no kernel compiled here. One worker
    # process runs it all: each process compiles (or loads) a kernel for these mods, and which
    # worker runs a pair does not change what it computes
    expected = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **kw)
    _check(
        dask_process_client,
        got,
        expected,
        np.float64,
        workers=list(dask_process_client.scheduler_info()["workers"])[:1],
    )


def test_numpy_inputs_chunked_by_default_and_two_d(dask_client):
    rng = np.random.default_rng(6)
    q, k, v = (_randn(rng, (1, 2, 4100, 8), np.float32) for _ in range(3))
    out = ed.scaled_dot_product_attention(q, k, v, is_causal=True)
    # rows in chunks of 2048; a chunk already holds 2048 rows, so one head per chunk
    assert out.chunks == ((1,), (1, 1), (2048, 2048, 4), (8,)) == ed.default_chunks((1,), 2, 4100) + ((8,),)
    np.testing.assert_allclose(
        out.compute(), engine.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu"), rtol=0, atol=1e-5
    )
    q2, k2, v2 = q[0, 0, :300], k[0, 0, :200], v[0, 0, :200]
    got = ed.scaled_dot_product_attention(
        da.from_array(q2, chunks=(64, 8)),
        da.from_array(k2, chunks=(50, 8)),
        da.from_array(v2, chunks=(50, 8)),
        return_lse=True,
    )
    assert got[0].shape == (300, 8) and got[1].shape == (300,)
    _check(
        dask_client, got, engine.scaled_dot_product_attention(q2, k2, v2, backend="cpu", return_lse=True), np.float32
    )


def test_default_chunks_group_heads_and_batch():
    assert ed.default_chunks((3, 5), 8, 100) == ((1, 1, 1), (2, 2, 1), (8,), (100,))
    assert ed.default_chunks((2,), 8, 5000) == ((1, 1), (1,) * 8, (2048, 2048, 904))
    assert ed.default_chunks((1,), 8, 600, group=4) == ((1,), (4, 4), (600,))


def test_zero_sizes_and_unsupported_dtypes():
    q = np.ones((1, 2, 5, 4), np.float32)
    out, lse = dask.compute(*ed.scaled_dot_product_attention(q, q[:, :, :0], q[:, :, :0], return_lse=True))
    assert (out == 0).all() and out.shape == (1, 2, 5, 4) and (lse == -np.inf).all()
    assert ed.scaled_dot_product_attention(q[:, :, :0], q, q).compute().shape == (1, 2, 0, 4)
    with pytest.raises(engine.NotSupportedError, match="float32 or float64"):
        ed.scaled_dot_product_attention(q.astype(np.float16), q.astype(np.float16), q.astype(np.float16))
    with pytest.raises(engine.NotSupportedError, match="E = 0"):
        ed.scaled_dot_product_attention(q[..., :0], q[..., :0], q, scale=1.0)


# -- the graph ------------------------------------------------------------------------------------
def test_causal_leaves_out_pairs_that_see_nothing_and_masks_only_the_diagonal():
    q = da.zeros((1, 1, 64, 8), chunks=(1, 1, 16, 8))
    out = ed.scaled_dot_product_attention(q, q, q, is_causal=True)
    pairs = _pair_keys(out)
    assert sorted(k[-2:] for k in pairs) == [(i, j) for i in range(4) for j in range(i + 1)]
    for key, task in pairs.items():
        qi, kj = key[-2:]
        assert _pair_info(task).causal == (tasks.CAUSAL_TOP_LEFT if qi == kj else tasks.CAUSAL_NONE)


def test_uneven_causal_boundary_pairs_get_an_offset_mask():
    q = da.zeros((1, 1, 30, 8), chunks=(1, 1, (10, 20), 8))
    k = da.zeros((1, 1, 30, 8), chunks=(1, 1, (15, 15), 8))
    pairs = _pair_keys(ed.scaled_dot_product_attention(q, k, k, is_causal=True))
    kinds = {key[-2:]: _pair_info(t).causal for key, t in pairs.items()}
    # rows 0-9 see keys 0-9 (chunk 0, offset mask); rows 10-29 see all of chunk 0 and part of chunk 1
    assert kinds == {(0, 0): tasks.CAUSAL_TOP_LEFT, (1, 0): tasks.CAUSAL_OFFSET, (1, 1): tasks.CAUSAL_OFFSET}
    assert _pair_info(pairs[next(k for k in pairs if k[-2:] == (1, 1))]).offset == 10 - 15


def test_mask_mod_block_map_leaves_out_empty_pairs():
    """A window |i - j| <= 3 over 8 chunks of 8 keys: only pairs within one chunk of the diagonal."""

    def band(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= 3

    q = da.zeros((1, 1, 64, 4), chunks=(1, 1, 8, 4))
    pairs = _pair_keys(ed.scaled_dot_product_attention(q, q, q, mask_mod=band))
    assert sorted(k[-2:] for k in pairs) == [(i, j) for i in range(8) for j in range(8) if abs(i - j) <= 1]
    # fully visible pairs would drop the mask_mod; here none is fully visible
    assert all(_pair_info(t).use_mask_mod for t in pairs.values())


def test_block_map_folds_uneven_chunks_per_batch_and_head():
    def only_head_one_first_rows(b, h, q_idx, kv_idx):
        return h == 1 and q_idx < 5 and b == 1

    kinds = visibility.mask_mod_kinds(
        engine.problems.mods.as_jit(only_head_one_first_rows, "m"),
        (),
        (2,),
        4,
        12,
        9,
        ((1, 1),),
        (2, 2),
        (3, 4, 5),
        (6, 3),
    )
    expected = np.zeros((2, 2, 3, 2), np.int8)
    expected[1, 0, 0, :] = visibility.PARTIAL  # heads 0-1: head 1 rows 0-2 all visible, head 0 none
    expected[1, 0, 1, :] = visibility.PARTIAL  # rows 3-6: rows 3, 4 visible
    np.testing.assert_array_equal(kinds, expected)


def test_merge_tree_is_fixed_at_build_time():
    """The tree depends on the chunks and split_every only: consecutive groups, in key order."""
    q = da.zeros((1, 1, 8, 4), chunks=(1, 1, 8, 4))
    k = da.zeros((1, 1, 90, 4), chunks=(1, 1, 9, 4))
    out = ed.scaled_dot_product_attention(q, k, k, split_every=3)
    graph = dict(out.__dask_graph__())
    merges = {key: t for key, t in graph.items() if str(key[0]).startswith("attention-merge-")}
    # 10 parts -> [0 1 2] [3 4 5] [6 7 8] [9] -> [m m m] [9] -> [m 9]: 3 + 1 + 1 merges
    assert len(merges) == 5
    assert [p[-1] for p in merges[max(merges, key=lambda k: k[1])][1]] == [0, 9]
    level0 = sorted((k for k in merges if k[1] == 0), key=lambda k: k[-1])
    assert [[p[-1] for p in merges[k][1]] for k in level0] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    again = dict(ed.scaled_dot_product_attention(q, k, k, split_every=3).__dask_graph__())
    assert again.keys() == graph.keys()
    with pytest.raises(ValueError, match="split_every must be an int >= 2"):
        ed.scaled_dot_product_attention(q, k, k, split_every=1)


def test_parameters_go_to_the_graph_once():
    q = da.zeros((1, 2, 32, 4), chunks=(1, 1, 8, 4))
    graph = dict(
        ed.scaled_dot_product_attention(q, q, q, score_mod=alibi_with_batch, mod_args=(np.ones(2),)).__dask_graph__()
    )
    specs = [k for k, t in graph.items() if isinstance(t, tasks.AttentionSpec)]
    assert len(specs) == 1
    pairs = [t for k, t in graph.items() if str(k[0]).startswith("attention-pair-")]
    assert len(pairs) == 2 * 4 * 4 and all(t[1] == specs[0] for t in pairs)


# -- bad chunking: refused while the graph is built ------------------------------------------------
def _never(block):
    raise AssertionError("a task ran")


def _lazy(shape, chunks):
    """A dask array whose tasks fail if they ever run."""
    return da.zeros(shape, chunks=chunks).map_blocks(_never, dtype=np.float64)


BAD = {
    "key and value chunked differently along S": (
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        ((1, 2, 16, 8), (1, 2, 4, 8)),
        {},
        "key and value must be chunked alike along S",
    ),
    "query's head dim split": (
        ((1, 2, 16, 8), (1, 2, 8, 4)),
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        {},
        r"query's feature axis \(E = 8\) is split",
    ),
    "value's head dim split": (
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        ((1, 2, 16, 6), (1, 2, 8, 3)),
        {},
        r"value's feature axis \(Ev = 6\) is split",
    ),
    # GQA head chunks that do not match the key's are aligned inside now: test_distributed_chunks.py
    "query and key chunked differently along heads": (
        ((1, 2, 16, 8), (1, 1, 8, 8)),
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        ((1, 2, 16, 8), (1, 2, 8, 8)),
        {},
        "chunked differently along the head axis",
    ),
    "batch chunked differently": (
        ((2, 2, 16, 8), (1, 2, 8, 8)),
        ((2, 2, 16, 8), (2, 2, 8, 8)),
        ((2, 2, 16, 8), (2, 2, 8, 8)),
        {},
        "chunked differently along batch axis 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_chunking_is_refused_before_any_task_runs(case):
    (qs, qc), (ks, kc), (vs, vc), kw, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        ed.scaled_dot_product_attention(_lazy(qs, qc), _lazy(ks, kc), _lazy(vs, vc), **kw)


def test_mask_chunked_unlike_the_scores_is_refused():
    q = _lazy((1, 2, 16, 8), (1, 2, 8, 8))
    mask = da.ones((1, 2, 16, 16), dtype=bool, chunks=(1, 2, 8, 4))
    with pytest.raises(ValueError, match=r"chunked differently along S .* key \(8, 8\), .*attn_mask \(4, 4, 4, 4\)"):
        ed.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_engine_validation_applies():
    q = _lazy((1, 2, 16, 8), (1, 2, 8, 8))
    with pytest.raises(ValueError, match="not both"):
        ed.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((16, 16), bool), is_causal=True)
    with pytest.raises(ValueError, match="same feature size E"):
        ed.scaled_dot_product_attention(q, _lazy((1, 2, 16, 4), (1, 2, 8, 4)), q)
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        ed.scaled_dot_product_attention(_lazy((1, 4, 16, 8), (1, 2, 8, 8)), q, q)


# -- threads --------------------------------------------------------------------------------------
def test_tasks_run_kernels_on_one_thread_each(monkeypatch):
    """On the local threaded scheduler (in this process): each pair and merge task calls the
    engine with one Numba thread on its own Python thread; the process-wide setting is untouched."""
    seen = []
    real_sdpa, real_merge = tasks._sdpa, tasks.merge_attention

    def sdpa(*a, **kw):
        seen.append(("pair", engine.get_num_threads()))
        return real_sdpa(*a, **kw)

    def merge(*a, **kw):
        seen.append(("merge", engine.get_num_threads()))
        return real_merge(*a, **kw)

    monkeypatch.setattr(tasks, "_sdpa", sdpa)
    monkeypatch.setattr(tasks, "merge_attention", merge)
    q = np.random.default_rng(0).standard_normal((1, 2, 40, 8)).astype(np.float32)
    qd = da.from_array(q, chunks=(1, 1, 10, 8))
    with dask.config.set(scheduler="threads", num_workers=2):
        ed.scaled_dot_product_attention(qd, qd, qd).compute()
    assert {w for w, _ in seen} == {"pair", "merge"} and {n for _, n in seen} == {1}
    assert engine.get_num_threads() != 1 or os.cpu_count() == 1


def _threads_in_a_task():
    import threadpoolctl

    from engine.distributed.threads import task_threads

    with task_threads():
        numba_threads = engine.get_num_threads()
    blas = {
        lib["internal_api"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"
    }
    return numba_threads, blas


def test_worker_processes_run_one_numba_and_one_blas_thread_per_task(dask_process_client):
    workers = list(dask_process_client.scheduler_info()["workers"])
    assert len(workers) == 2
    for numba_threads, blas in dask_process_client.gather(
        [dask_process_client.submit(_threads_in_a_task, pure=False, workers=[w]) for w in workers]
    ):
        assert numba_threads == 1
        assert blas and set(blas.values()) == {1}


def test_import_engine_does_not_import_dask():
    code = (
        "import sys, engine, numpy as np; q = np.ones((1, 1, 4, 4), np.float32); "
        "engine.scaled_dot_product_attention(q, q, q, backend='reference'); "
        "print(sorted(m for m in ('dask', 'distributed', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip() == "[]"
