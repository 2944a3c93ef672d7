"""The forward kernel's three steps on one tile, per GEMM provider, on one thread.

For each tile shape (key rows x query rows x head size) and each installed float32 provider: the
scores product as the ``cpu`` forward now calls it (``K_tile @ Q_tile.T`` with the query tile
copied row-major, ``engine.kernels.cpu.flash_fwd``), the same with the transposed view it passed
before, the softmax pass over the scores (``softmax_tile.exp_tile``) and the values product
(``P.T @ V_tile``, accumulated). Each figure is the best of 5 blocks of 200 calls inside one
compiled loop, in this thread's CPU time. Then the whole forward (B = 1, H = 8, float32) with each
provider forced and its own measured tiles, one thread, seven rounds of alternating calls (min and
median of thread CPU time). Last, the softmax pass alone on tiles from 32 x 64 (16 KiB of scores and
probabilities: in L1) to 1024 x 512 (4 MiB: past L2): the bound on what fusing the exponential into
the scores product's registers could save (the tile's store and load; the arithmetic stays).
Printed, no JSON. Run: ``python bench/provider_tiles.py``
(for the 256-bit build of ``fma`` on an AVX-512 CPU, with ``NUMBA_CPU_NAME=haswell``, the Haswell
features in ``NUMBA_CPU_FEATURES``, a fresh ``NUMBA_CACHE_DIR`` and ``OPENBLAS_CORETYPE=Haswell``).
"""

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import time  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from engine.kernels.cpu.gemm import GEMM_CBLAS, tile_gemm, tile_gemm_acc  # noqa: E402
from engine.kernels.cpu.softmax_tile import exp_tile  # noqa: E402
from engine.runtime.gemm_providers import load_provider  # noqa: E402
from engine.runtime.machine import cpu_model  # noqa: E402

#: (key rows, query rows, head size)
TILES = [(256, 256, 64), (128, 256, 64), (256, 256, 128), (512, 256, 64), (128, 64, 64), (32, 32, 64)]
PROVIDERS = ("openblas", "fma", "mkl")
BLOCKS, CALLS = 5, 200


@njit
def _scores(n, fn, kt, q, st):
    for _ in range(n):
        tile_gemm(GEMM_CBLAS, fn, kt, q, st)


@njit
def _softmax(n, st, pt, scale, shift, ts, tc, tmx):
    for _ in range(n):
        exp_tile(st, pt, scale, shift, ts, tc, tmx)


@njit
def _values(n, fn, pt, vt, acc):
    for _ in range(n):
        tile_gemm_acc(GEMM_CBLAS, fn, pt.T, vt, acc)


def _best(run) -> float:
    run(3)
    best = float("inf")
    for _ in range(BLOCKS):
        t = time.thread_time()
        run(CALLS)
        best = min(best, (time.thread_time() - t) / CALLS)
    return best


def main():
    print(f"{cpu_model()}, one thread; GFLOP/s of the products, ns per score of the softmax pass")
    rng = np.random.default_rng(0)
    for nk, nq, e in TILES:
        kt = rng.standard_normal((nk, e)).astype(np.float32)
        q = rng.standard_normal((nq, e)).astype(np.float32)
        q_rows = np.ascontiguousarray(q.T)  # the forward's copy
        vt = rng.standard_normal((nk, e)).astype(np.float32)
        st, pt = np.empty((nk, nq), np.float32), np.empty((nk, nq), np.float32)
        acc = np.zeros((nq, e), np.float32)
        shift = np.full(nq, 3.0, np.float32)
        ts, tc, tmx = np.zeros(nq), np.zeros(nq, np.float32), np.zeros(nq, np.float32)
        flops = 2.0 * nk * nq * e
        for name in PROVIDERS:
            p = load_provider(name)
            if isinstance(p, str):
                continue
            fn = p.pointer("float32")
            rows = _best(lambda n: _scores(n, fn, kt, q_rows, st))
            view = _best(lambda n: _scores(n, fn, kt, q.T, st))
            soft = _best(lambda n: _softmax(n, st, pt, np.float32(0.125), shift, ts, tc, tmx))
            vals = _best(lambda n: _values(n, fn, pt, vt, acc))
            print(
                f"{nk} x {nq} x {e:<4} {name:<9} scores {flops / rows / 1e9:5.0f} (transposed view "
                f"{flops / view / 1e9:5.0f})   softmax pass {soft * 1e9 / (nk * nq):.3f} ns   "
                f"values {flops / vals / 1e9:5.0f}",
                flush=True,
            )


def whole_calls():
    import engine

    engine.set_num_threads(1)
    rng = np.random.default_rng(0)
    names = [n for n in PROVIDERS if not isinstance(load_provider(n), str)]
    print("\nthe whole forward, one thread, each provider forced (ms: min / median of 7)")
    for L, e in ((1024, 64), (4096, 64), (2048, 128)):
        q, k, v = (rng.standard_normal((1, 8, L, e)).astype(np.float32) for _ in range(3))
        times = {n: [] for n in names}
        for n in names:  # first calls: compile or load, and measure the provider's tiles
            engine.set_gemm_provider(n)
            engine.scaled_dot_product_attention(q, k, v, backend="cpu")
        for r in range(7):
            for n in names if r % 2 == 0 else names[::-1]:
                engine.set_gemm_provider(n)
                t = time.thread_time()
                engine.scaled_dot_product_attention(q, k, v, backend="cpu")
                times[n].append(time.thread_time() - t)
        engine.set_gemm_provider(None)
        row = "   ".join(f"{n} {min(t) * 1e3:.1f} / {np.median(t) * 1e3:.1f}" for n, t in times.items())
        print(f"L = {L}, head {e}: {row}", flush=True)


#: (key rows, query rows) of the softmax pass alone, from L1-resident to past L2
RESIDENCY_TILES = [(32, 64), (64, 64), (128, 64), (256, 256), (512, 256), (1024, 512)]


def softmax_residency():
    """ns per score of the softmax pass by where its tile lives: the same figure in L1 as past L2
    means the pass is bound by its arithmetic, not by reading the scores back."""
    print("\nthe softmax pass alone, by tile size (scores + probabilities), one thread")
    rng = np.random.default_rng(0)
    for nk, nq in RESIDENCY_TILES:
        st = (3 * rng.standard_normal((nk, nq))).astype(np.float32)
        pt = np.empty_like(st)
        shift = st.max(axis=0)
        ts, tc, tmx = np.zeros(nq), np.zeros(nq, np.float32), np.zeros(nq, np.float32)
        soft = _best(lambda n: _softmax(n, st, pt, np.float32(0.125), shift, ts, tc, tmx))
        print(f"{nk} x {nq} ({2 * st.nbytes // 1024} KiB): {soft * 1e9 / (nk * nq):.3f} ns/score", flush=True)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    main()
    whole_calls()
    softmax_residency()
