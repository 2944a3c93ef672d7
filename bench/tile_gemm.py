"""Tile-product speed of every GEMM provider, at the ``cpu`` kernel's tile shapes, on one thread.

    python bench/tile_gemm.py [--rounds R] [--reps N] [--json PATH | --no-json]

Each engine provider computes the kernel's two products through ``engine.kernels.cpu.gemm.tile_gemm``,
the call the kernel makes (so what is measured is what runs); BLIS (the ``blis`` package's typed
API) and a register-blocked Numba loop are measured beside them (not offered by the engine): the scores
``(256 x E) @ (E x 128)`` and
the weighted values ``P.T (128 x 256, a transposed view) @ (256 x Ev)``, for head sizes 64 and 128,
float32 and float64. Rounds alternate the providers (the order rotates every round); each figure
is the median over the rounds of a block of ``--reps`` calls inside one compiled loop (no Python
per call). Results are GFLOP/s and the ratio to ``numpy`` (SciPy's OpenBLAS, the fallback) in the
same round. Single-thread blocks are timed in the thread's CPU time (``time.thread_time``), which
time spent descheduled by other processes does not inflate (wall-clock medians are in the JSON
too); the 2-thread table is wall time. Every provider's product is first checked against float64 NumPy.

A second table runs the same loop in ``prange`` over 2 threads (one private buffer set each), to
show whether a provider's per-core rate holds when both cores work (the kernel's parallel case).

Writes ``bench/results/tile-gemm-<cpu>-<date>.json`` by default (CPU model and family/model in the
name). Figures taken while other work shares the machine are only good for ratios in one run.
"""

from __future__ import annotations

import os

#: where results are written (``bench/results/<what>-<cpu>-<date>.json``)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# one thread for every BLAS before any is loaded (SciPy's OpenBLAS would start its own threads)
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.kernels.cpu.gemm import _data_ptr, tile_gemm  # noqa: E402
from engine.runtime import gemm_info, gemm_providers  # noqa: E402
from engine.runtime.machine import cpu_info, result_file_name  # noqa: E402

#: candidates measured here but not offered by the engine (they lost): bench-local kind codes
BENCH_BLIS, BENCH_LOOPS = 100, 101
#: BLIS ``trans_t`` (blis.h: BLIS_NO_TRANSPOSE)
_BLIS_NO_TRANS = 0


def _scalar_slot(context, builder, ty, val):
    """A pointer to a stack copy of a scalar (BLIS takes alpha and beta by pointer)."""
    slot = cgutils.alloca_once(builder, context.get_value_type(ty))
    builder.store(val, slot)
    return builder.bitcast(slot, ir.IntType(8).as_pointer())


@intrinsic
def _blis_call(typingctx, fn, trans_a, trans_b, m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc):
    """``fn(trans_a, trans_b, m, n, k, &alpha, a, rsa, csa, b, rsb, csb, &beta, c, rsc, csc)``:
    BLIS's typed ``bli_?gemm`` (``trans_t`` a C int, sizes and strides 64-bit)."""
    if not (isinstance(alpha, types.Float) and alpha == beta):
        return None
    sig = types.void(fn, trans_a, trans_b, m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vp = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(
            ir.VoidType(), [i32, i32, i64, i64, i64, vp, vp, i64, i64, vp, i64, i64, vp, vp, i64, i64]
        )
        f = builder.inttoptr(args[0], fnty.as_pointer())
        ty = signature.args
        builder.call(
            f,
            [
                builder.trunc(args[1], i32),
                builder.trunc(args[2], i32),
                args[3],
                args[4],
                args[5],
                _scalar_slot(context, builder, ty[6], args[6]),
                _data_ptr(context, builder, ty[7], args[7]),
                args[8],
                args[9],
                _data_ptr(context, builder, ty[10], args[10]),
                args[11],
                args[12],
                _scalar_slot(context, builder, ty[13], args[13]),
                _data_ptr(context, builder, ty[14], args[14]),
                args[15],
                args[16],
            ],
        )
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath={"contract", "reassoc", "nsz", "arcp"})
def gemm_loops(a, b, c):
    """``c = a @ b`` in Numba loops: four rows of ``c`` at a time, each a vectorised sweep over
    ``b``'s rows (a ``c`` row stays in L1 while the four ``a`` values stream)."""
    m, kk = a.shape
    n = b.shape[1]
    zero = c.dtype.type(0)
    i = 0
    while i + 4 <= m:
        c0, c1, c2, c3 = c[i], c[i + 1], c[i + 2], c[i + 3]
        for j in range(n):
            c0[j] = zero
            c1[j] = zero
            c2[j] = zero
            c3[j] = zero
        for p in range(kk):
            a0, a1, a2, a3 = a[i, p], a[i + 1, p], a[i + 2, p], a[i + 3, p]
            bp = b[p]
            for j in range(n):
                bj = bp[j]
                c0[j] += a0 * bj
                c1[j] += a1 * bj
                c2[j] += a2 * bj
                c3[j] += a3 * bj
        i += 4
    while i < m:
        ci = c[i]
        for j in range(n):
            ci[j] = zero
        for p in range(kk):
            ap = a[i, p]
            bp = b[p]
            for j in range(n):
                ci[j] += ap * bp[j]
        i += 1


class BenchCandidate:
    """A measured candidate that is not an engine provider (same attributes the loop uses)."""

    def __init__(self, name, kind, functions, version):
        self.name, self.kind, self.functions, self.version = name, kind, functions, version

    def pointer(self, dtype):
        return self.functions.get(dtype, 0)


def load_blis():
    """BLIS's typed API from the ``blis`` package (its compiled extension exports bli_?gemm)."""
    import blis
    import blis.about

    so = sorted(glob.glob(os.path.join(os.path.dirname(blis.__file__), "cy.*")))
    lib = ctypes.CDLL(so[0])
    lib.bli_arch_query_id.restype = ctypes.c_int
    lib.bli_arch_string.restype = ctypes.c_char_p
    arch = lib.bli_arch_string(lib.bli_arch_query_id()).decode()
    addr = lambda n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value  # noqa: E731
    cand = BenchCandidate(
        "blis",
        BENCH_BLIS,
        {"float32": addr("bli_sgemm"), "float64": addr("bli_dgemm")},
        f"BLIS (blis {blis.about.__version__}), '{arch}' kernels",
    )
    cand.library = lib
    return cand


@njit
def _gemm(kind, fn, a, b, c):
    if kind == BENCH_BLIS:
        isz = a.itemsize
        _blis_call(
            fn,
            _BLIS_NO_TRANS,
            _BLIS_NO_TRANS,
            a.shape[0],
            b.shape[1],
            a.shape[1],
            c.dtype.type(1),
            a,
            a.strides[0] // isz,
            a.strides[1] // isz,
            b,
            b.strides[0] // isz,
            b.strides[1] // isz,
            c.dtype.type(0),
            c,
            c.strides[0] // c.itemsize,
            1,
        )
    elif kind == BENCH_LOOPS:
        gemm_loops(a, b, c)
    else:
        tile_gemm(kind, fn, a, b, c)


BLOCK_Q, BLOCK_K = 128, 256


def shapes(head):
    """(name, a, b, c) factories: the kernel's two products at this head size."""
    return [
        (f"scores E={head}: (256x{head}) @ ({head}x128)", (BLOCK_K, head), "C", (head, BLOCK_Q)),
        (f"P.T @ V E={head}: (128x256)^T-view @ (256x{head})", (BLOCK_Q, BLOCK_K), "F", (BLOCK_K, head)),
    ]


def operands(a_shape, a_order, b_shape, dtype, rng):
    a = rng.standard_normal(a_shape).astype(dtype)
    if a_order == "F":  # the kernel passes st.T: a C-ordered (256, 128) buffer seen transposed
        a = np.ascontiguousarray(a.T).T
    b = rng.standard_normal(b_shape).astype(dtype)
    c = np.empty((a_shape[0], b_shape[1]), dtype=dtype)
    return a, b, c


@njit
def _repeat(kind, fn, a, b, c, reps):
    for _ in range(reps):
        _gemm(kind, fn, a, b, c)


@njit(parallel=True)
def _repeat_parallel(kind, fn, a, b, c, reps, transpose_a):
    for t in prange(a.shape[0]):
        for _ in range(reps):
            if transpose_a:
                _gemm(kind, fn, a[t].T, b[t], c[t])
            else:
                _gemm(kind, fn, a[t], b[t], c[t])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=40, help="calls per timed block")
    ap.add_argument("--json", metavar="PATH", help="where to write (default bench/results/tile-gemm-<cpu>-<date>.json)")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--no-parallel", action="store_true", help="skip the 2-thread table")
    a = ap.parse_args(argv)
    import numba

    info = cpu_info()
    status = gemm_info.available_gemm_providers()
    providers = [gemm_providers.load_provider(n) for n in gemm_providers.PROVIDERS]
    providers = [p for p in providers if not isinstance(p, str)]
    try:
        blis_c = load_blis()
        providers.append(blis_c)
        status["blis (bench only)"] = blis_c.version
    except (ImportError, OSError, IndexError, AttributeError) as exc:
        status["blis (bench only)"] = f"not measured: {exc}"
    providers.append(BenchCandidate("loops", BENCH_LOOPS, {}, "Numba loops, 4 rows of C per sweep"))
    status["loops (bench only)"] = providers[-1].version
    print(
        f"CPU: {info['model_name']} ({info['vendor']} family {info['family']} model {info['model']}"
        f"{', ' + info['generation'] if 'generation' in info else ''}); ISA: {' '.join(info['isa'])}; "
        f"load {info.get('loadavg_1_5_15')}"
    )
    for n, s in status.items():
        print(f"  {n:18s} {s}")
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float32", "float64"):
        for head in (64, 128):
            for name, a_shape, order, b_shape in shapes(head):
                A, B, C = operands(a_shape, order, b_shape, dtype, rng)
                ref = A.astype(np.float64) @ B.astype(np.float64)
                flops = 2.0 * a_shape[0] * a_shape[1] * b_shape[1]
                times, walls = {}, {}
                for p in providers:
                    C[:] = np.nan
                    _repeat(p.kind, p.pointer(dtype), A, B, C, 1)
                    tol = (1e-4 if dtype == "float32" else 1e-12) * np.abs(ref).max()
                    err = float(np.abs(C - ref).max())
                    if not err <= tol:
                        raise AssertionError(f"{p.name} {dtype} {name}: error {err} > {tol}")
                    times[p.name], walls[p.name] = [], []
                for r in range(a.rounds):
                    order_r = providers[r % len(providers) :] + providers[: r % len(providers)]
                    for p in order_r:
                        w, t = time.perf_counter(), time.thread_time()
                        _repeat(p.kind, p.pointer(dtype), A, B, C, a.reps)
                        times[p.name].append((time.thread_time() - t) / a.reps)
                        walls[p.name].append((time.perf_counter() - w) / a.reps)
                base = times["numpy"]
                for p in providers:
                    med = statistics.median(times[p.name])
                    ratio = statistics.median(b / t for b, t in zip(base, times[p.name]))
                    rows.append(
                        {
                            "threads": 1,
                            "dtype": dtype,
                            "product": name,
                            "provider": p.name,
                            "gflops": flops / med / 1e9,
                            "us_per_call": med * 1e6,
                            "best_gflops": flops / min(times[p.name]) / 1e9,
                            "wall_gflops": flops / statistics.median(walls[p.name]) / 1e9,
                            "ratio_to_numpy": ratio,
                        }
                    )
                print(
                    f"\n{dtype} {name} (1 thread): "
                    + ", ".join(
                        f"{r['provider']} {r['gflops']:.1f} GF/s ({r['ratio_to_numpy']:.2f}x)"
                        for r in rows[-len(providers) :]
                    ),
                    flush=True,
                )
    if not a.no_parallel and numba.config.NUMBA_NUM_THREADS >= 2:
        numba.set_num_threads(2)
        for dtype in ("float32",):
            for name, a_shape, order, b_shape in shapes(64):
                A, B, C = zip(*(operands(a_shape, order, b_shape, dtype, rng) for _ in range(2)))
                tr = order == "F"  # stored as the C-ordered transpose, passed as its .T view
                A = np.stack([x.T if tr else x for x in A])
                B, C = np.stack(B), np.stack(C)
                flops = 2 * 2.0 * a_shape[0] * a_shape[1] * b_shape[1]
                times = {p.name: [] for p in providers}
                for p in providers:
                    _repeat_parallel(p.kind, p.pointer(dtype), A, B, C, 1, tr)
                for r in range(a.rounds):
                    for p in providers[r % len(providers) :] + providers[: r % len(providers)]:
                        t = time.perf_counter()
                        _repeat_parallel(p.kind, p.pointer(dtype), A, B, C, a.reps, tr)
                        times[p.name].append((time.perf_counter() - t) / a.reps)
                for p in providers:
                    med = statistics.median(times[p.name])
                    rows.append(
                        {
                            "threads": 2,
                            "dtype": dtype,
                            "product": name,
                            "provider": p.name,
                            "gflops": flops / med / 1e9,
                            "us_per_call": med * 1e6,
                            "ratio_to_numpy": statistics.median(b / t for b, t in zip(times["numpy"], times[p.name])),
                        }
                    )
                print(
                    f"\n{dtype} {name} (2 threads, both cores): "
                    + ", ".join(
                        f"{r['provider']} {r['gflops']:.1f} GF/s ({r['ratio_to_numpy']:.2f}x)"
                        for r in rows[-len(providers) :]
                    ),
                    flush=True,
                )
    info["loadavg_after"] = list(os.getloadavg())
    if not a.no_json:
        path = a.json or os.path.join(RESULTS, result_file_name("tile-gemm", info))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(
                {
                    "command": "python bench/tile_gemm.py " + " ".join(argv or sys.argv[1:]),
                    "cpu": info,
                    "providers": status,
                    "rounds": a.rounds,
                    "reps": a.reps,
                    "numpy": np.__version__,
                    "numba": numba.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "rows": rows,
                },
                f,
                indent=1,
            )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
