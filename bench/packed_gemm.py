"""Would packing the query tile once per task speed up the ``cpu`` forward's scores products?

    python bench/packed_gemm.py [--rounds R] [--reps N]

A forward task multiplies its query tile (``bq`` rows of head size E) with every key tile of its
sequence: ``st = k[j0 : j0 + bk] @ q.T``, one ``cblas_sgemm`` per key tile. A BLAS packs both
operands on every call, so the query tile is packed again for each key tile although it never
changes. oneMKL's packed GEMM packs it once (``cblas_sgemm_pack``) and multiplies each key tile
with the packed copy (``cblas_sgemm_compute``). This times one task's products three ways, one
thread, float32: ``scipy-openblas32``'s ``cblas_sgemm`` (the engine's ``openblas`` provider),
oneMKL's ``cblas_sgemm`` (``mkl``), and oneMKL with the query tile packed once (the packing
counted). Each is checked against NumPy first (the last key tile's scores). Rounds alternate the
three; figures are the medians over rounds of the mean of ``--reps`` tasks, in wall time, printed
(no JSON). Each call also costs about 2 us of ctypes and Python (measured with m = n = k = 0),
beside products of 14 to 90 us at L = 1024: about a sixth of a 64 x 128 task's time; the packed
variant makes one call more per task.
Needs the ``mkl`` package (the ``gemm`` extra) and ``scipy-openblas32``.
"""

from __future__ import annotations

import os

# one thread for every BLAS before any is loaded
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from engine.runtime.gemm_libraries import LOADERS  # noqa: E402

# CBLAS constants (cblas.h; CblasPacked and CblasBMatrix from oneMKL's mkl_cblas.h)
ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162
_i, _f, _p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SGEMM = [_i, _i, _i, _i, _i, _i, _f, _p, _i, _p, _i, _f, _p, _i]

#: (query tile rows, key tile rows): four of the tiles the engine's tuning searches (the three it
#: stored for head 64 on an AMD Zen 4, and 128 x 256); LENGTH_STEP keeps every key tile whole
TILES = ((256, 256), (128, 256), (256, 128), (64, 128))
LENGTH_STEP = 256


def _sgemm(lib, name):
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = _SGEMM, None
    return fn


def task_products(L: int, E: int, bq: int, bk: int):
    """Three callables, each one task's scores products, and the arrays they read and write by
    address (keep them alive while the callables run)."""
    mkl = LOADERS["mkl"]().libraries[0]
    openblas = LOADERS["openblas"]().libraries[0]
    mkl.cblas_sgemm_pack_get_size.argtypes = [_i, _i, _i, _i]
    mkl.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    mkl.cblas_sgemm_pack.argtypes = [_i, _i, _i, _i, _i, _i, _f, _p, _i, _p]
    mkl.cblas_sgemm_compute.argtypes = [_i, _i, _i, _i, _i, _i, _p, _i, _p, _i, _f, _p, _i]
    rng = np.random.default_rng(0)
    k = rng.standard_normal((L, E)).astype(np.float32)
    q = rng.standard_normal((bq, E)).astype(np.float32)
    st = np.empty((bk, bq), np.float32)
    kp, qp, sp = k.ctypes.data, q.ctypes.data, st.ctypes.data
    packed = np.empty(mkl.cblas_sgemm_pack_get_size(B_MATRIX, bk, bq, E) // 4 + 16, np.float32)
    pp = packed.ctypes.data

    def plain(sgemm):
        def run():
            for j0 in range(0, L, bk):
                sgemm(ROW_MAJOR, NO_TRANS, TRANS, bk, bq, E, 1.0, kp + 4 * j0 * E, E, qp, E, 0.0, sp, bq)

        return run

    def mkl_packed():
        mkl.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS, bk, bq, E, 1.0, qp, E, pp)
        for j0 in range(0, L, bk):
            mkl.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, bk, bq, E, kp + 4 * j0 * E, E, pp, E, 0.0, sp, bq)

    runs = {
        "openblas": plain(_sgemm(openblas, "scipy_cblas_sgemm")),
        "mkl": plain(_sgemm(mkl, "cblas_sgemm")),
        "mkl, query packed once": mkl_packed,
    }
    for run in runs.values():  # each must compute the last key tile's scores
        st[:] = np.nan
        run()
        np.testing.assert_allclose(st, k[(L - 1) // bk * bk :][:bk] @ q.T, rtol=1e-4, atol=1e-4)
    return runs, (k, q, st, packed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50, help="tasks per timed block")
    ap.add_argument(
        "--length", type=int, default=1024, help=f"keys per sequence, a multiple of {LENGTH_STEP} (default 1024)"
    )
    a = ap.parse_args(argv)
    if a.length <= 0 or a.length % LENGTH_STEP:  # a partial key tile would be read past k's end
        ap.error(f"--length must be a positive multiple of {LENGTH_STEP}, got {a.length}")
    E = 64
    print(f"one task's scores products, L = {a.length}, head {E}, float32, one thread; us per task (GFLOP/s)")
    for bq, bk in TILES:
        runs, arrays = task_products(a.length, E, bq, bk)  # noqa: F841  (arrays: kept alive)
        times = {name: [] for name in runs}
        names = list(runs)
        for r in range(a.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                for _ in range(a.reps):
                    runs[name]()
                times[name].append((time.perf_counter() - t) / a.reps)
        flops = 2.0 * a.length * bq * E
        line = ", ".join(
            f"{n} {statistics.median(s) * 1e6:.0f} ({flops / statistics.median(s) / 1e9:.0f})" for n, s in times.items()
        )
        print(f"  query tile {bq:3d} x key tile {bk:3d}: {line}")


if __name__ == "__main__":
    main()
