"""Compile the ``cuda`` backend's kernels with numba-cuda-mlir instead of numba-cuda (issue 20).

numba-cuda is in maintenance mode (security and critical fixes); NVIDIA's new work goes to
numba-cuda-mlir, meant as a drop-in ``from numba_cuda_mlir import cuda``. This script compiles
every kernel specialisation the backend launches to PTX (compute capability 9.0) twice, with
numba-cuda as the backend does and with numba-cuda-mlir (the kernel module's ``cuda`` rebound to
numba-cuda-mlir's), and prints, per kernel: OK or the first line of the error, the compile time and
whether a ``call`` is left in the PTX. No GPU is needed (see the notes on ``_cached_cc`` below).

It needs both packages, in an environment of its own (numba-cuda-mlir brings its own copy of
Numba's type system and does not need Numba; the engine's CPU code does):

    python3 -m venv /tmp/mlir
    /tmp/mlir/bin/pip install "numba-cuda-mlir[cu13]" "numba-cuda[cu13]" ml-dtypes scipy pluggy array-api-compat
    PYTHONPATH=. /tmp/mlir/bin/python bench/numba_cuda_mlir_trial.py [--json out.json]

What it had to work around, each a difference from numba-cuda that a port must handle:

* numba-cuda-mlir has its own type objects: a signature built from ``numba.types`` is refused
  ("expected a type instance"); :func:`convert` rebuilds it from ``numba_cuda_mlir.cuda.types``.
* its ``compile_ptx`` asks the driver for the current GPU's compute capability even when ``cc`` is
  given, so without a GPU it fails at driver initialisation; the script pre-sets the value it
  caches (``numba_cuda_mlir.tools._cached_cc``), as the PTX tests tell numba-cuda "the current
  device is 9.0".
* overloads registered with ``numba.cuda.extending.overload`` (the engine's bfloat16 bit casts,
  ``fast_exp``/``fast_tanh`` on the GPU) are invisible to it; the script registers the same
  overloads in numba-cuda-mlir's registry (``--no-reregister`` shows the failure without them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

import numpy as np


def convert(t, mt):
    """A ``numba.types`` type as the same ``numba_cuda_mlir.cuda.types`` type."""
    from numba.core import types as nt

    if isinstance(t, nt.Array):
        return mt.Array(convert(t.dtype, mt), t.ndim, t.layout)
    if isinstance(t, (nt.Tuple, nt.UniTuple)):
        return mt.Tuple(tuple(convert(x, mt) for x in t))
    return getattr(mt, str(t))


def forward_kernels():
    """(name, kernel module, build) of every forward specialisation the backend launches at the
    default tiles for head size 64: ``build()`` returns (python function, numba-cuda signature)."""
    from engine.backends.cuda.forward import tile_sizes
    from engine.kernels.cuda import flash_fwd as fwd
    from engine.kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE

    bq, bk = tile_sizes(64, 64)
    kinds = [
        (MASK_NONE, False, "none"),
        (MASK_NONE, True, "causal"),
        (MASK_BOOL, False, "bool"),
        (MASK_FLOAT, False, "float"),
    ]
    for storage, bf16 in ((np.float32, False), (np.float16, False), (np.uint16, True)):
        for kind, causal, kname in kinds:
            dname = "bfloat16" if bf16 else np.dtype(storage).name

            def build(kind=kind, causal=causal, storage=storage, bf16=bf16):
                fn = fwd.flash_kernel_source(
                    64, 64, bq, bk, kind, causal, bf16=bf16, mask_bf16=bf16 and kind == MASK_FLOAT
                )
                mask = storage if kind == MASK_FLOAT else np.bool_
                return fn, fwd.kernel_signature(storage, mask)

            yield f"forward {dname} {kname}", fwd, build


def forward_mod_kernels():
    """The forward with the built-in variants' mods compiled in (float32, head size 64)."""
    from engine.backends.cuda.forward import tile_sizes
    from engine.kernels.cuda import flash_fwd as fwd
    from engine.kernels.kinds import MASK_NONE
    from variants.alibi import alibi_bias, alibi_slopes
    from variants.document import same_document
    from variants.softcap import tanh_softcap

    bq, bk = tile_sizes(64, 64)
    mods = {
        "alibi": (alibi_bias, None, (alibi_slopes(8).astype(np.float32),)),
        "softcap": (tanh_softcap, None, (np.float32(50.0),)),
        "document": (None, same_document, (np.zeros((2, 64), dtype=np.int64),)),
    }
    for mname, (score_mod, mask_mod, mod_args) in mods.items():

        def build(score_mod=score_mod, mask_mod=mask_mod, mod_args=mod_args):
            fn = fwd.flash_kernel_source(64, 64, bq, bk, MASK_NONE, False, score_mod, mask_mod)
            return fn, fwd.kernel_signature(np.float32, None, mod_args)

        yield f"forward float32 {mname}", fwd, build


def decode_kernels():
    """The decode kernels (split-KV attention, split merge, device cache write) per cache dtype,
    at the backend's tiles for head size 128 and a GQA group of 8 rows."""
    from engine.backends.cuda.decode import decode_tiles
    from engine.kernels.cuda import decode as kd
    from engine.runtime.config import CUDA_DECODE_THREADS

    kinds = {"float32": kd.CACHE_FLOAT32, "float16": kd.CACHE_FLOAT16, "bfloat16": kd.CACHE_BFLOAT16}
    rb, bk = decode_tiles(128, 128, 8)
    for dname, kind in kinds.items():

        def split(kind=kind):
            return kd.decode_kernel_source(128, 128, rb, bk, CUDA_DECODE_THREADS, kind), kd.decode_signature(kind)

        def merge(kind=kind):
            return kd.merge_kernel_source(kind), kd.merge_signature(kind)

        def write(kind=kind):
            return kd.write_kernel_source(kind, kind, kind), kd.write_signature(kind, kind, kind)

        yield f"decode split {dname}", kd, split
        yield f"decode merge {dname}", kd, merge
        yield f"decode write {dname}", kd, write


def backward_kernels():
    """The three backward kernels per storage dtype (head size 64, the backend's tiles), plus
    dropout with the mask gradient (float32)."""
    from engine.backends.cuda.backward import backward_tile_sizes
    from engine.kernels.cuda import flash_bwd as kb
    from engine.kernels.kinds import MASK_FLOAT, MASK_NONE

    bq, bk = backward_tile_sizes(64, 64)
    cases = [
        ("float32 causal", np.float32, None, dict(mask_kind=MASK_NONE, causal=True)),
        ("float16 causal", np.float16, None, dict(mask_kind=MASK_NONE, causal=True)),
        ("bfloat16 causal", np.uint16, None, dict(mask_kind=MASK_NONE, causal=True, bf16=True)),
        (
            "float32 dropout+dmask",
            np.float32,
            np.float32,
            dict(mask_kind=MASK_FLOAT, causal=False, dropout=True, want_dm=True),
        ),
    ]
    for cname, storage, mask, kw in cases:
        for i, kname in enumerate(("preprocess", "dkdv", "dq")):

            def build(storage=storage, mask=mask, kw=kw, i=i):
                fns = kb.backward_kernel_sources(64, 64, bq, bk, **kw)
                return fns[i], kb.backward_signatures(storage, mask)[i]

            yield f"backward {kname} {cname}", kb, build


KERNELS = [forward_kernels, forward_mod_kernels, decode_kernels, backward_kernels]


def _reregister(mcuda):
    """The engine's numba-cuda overloads, registered again in numba-cuda-mlir's registry."""
    overload = mcuda.extending.overload

    from engine.kernels.cuda import bfloat16 as bf
    from engine.kernels.fastexp import fast_exp, fast_tanh

    libdevice, int32, uint32, float32 = mcuda.libdevice, mcuda.int32, mcuda.uint32, mcuda.float32

    @overload(bf.int32_as_float32, target="cuda", inline="always")
    def _i2f(i):
        return lambda i: libdevice.int_as_float(int32(i))

    @overload(bf.float32_as_uint32, target="cuda", inline="always")
    def _f2u(x):
        return lambda x: uint32(libdevice.float_as_int(float32(x)))

    @overload(fast_exp, target="cuda", inline="always")
    def _exp(t):
        return lambda t: math.exp(t)

    @overload(fast_tanh, target="cuda", inline="always")
    def _tanh(x):
        return lambda x: math.tanh(x)


@contextlib.contextmanager
def _rebound(modules, mcuda):
    """Module globals ``cuda`` and Numba types (``float32``, ``uint32``...) as numba-cuda-mlir's."""
    from numba.core import types as nt

    saved = []
    for mod in modules:
        for name, value in list(vars(mod).items()):
            if name == "cuda" or (isinstance(value, nt.Type) and hasattr(mcuda, name)):
                saved.append((mod, name, value))
                setattr(mod, name, getattr(mcuda, name) if name != "cuda" else mcuda)
        getattr(mod, "_device_functions", {}).clear()
        if hasattr(mod, "_philox_device"):  # built once, with whichever cuda was bound
            saved.append((mod, "_philox_device", mod._philox_device))
            mod._philox_device = None
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        for mod in modules:
            getattr(mod, "_device_functions", {}).clear()


def _compile(compile_ptx, fn, sig):
    t0 = time.perf_counter()
    try:
        ptx, _ = compile_ptx(fn, sig, cc=(9, 0))
    except Exception as exc:  # the trial records what fails, and goes on
        return {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    calls = [ln for ln in ptx.splitlines() if ln.strip().startswith("call")]
    return {"ok": True, "seconds": round(time.perf_counter() - t0, 2), "ptx_bytes": len(ptx), "calls": len(calls)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-reregister", action="store_true", help="leave the engine's overloads unregistered")
    args = ap.parse_args(argv)

    import types

    import numba_cuda_mlir
    import numba_cuda_mlir.tools
    from numba import cuda as ncuda
    from numba.cuda import dispatcher
    from numba_cuda_mlir import cuda as mcuda

    from engine.kernels import philox as philox_module
    from engine.kernels.cuda import bfloat16 as bf16_module
    from engine.kernels.cuda import flash_fwd as fwd_module

    # no GPU here: both compile device functions for the "current device", said to be 9.0
    numba_cuda_mlir.tools._cached_cc = (9, 0)
    if not ncuda.is_available():
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    if not args.no_reregister:
        _reregister(mcuda)
    rows = []
    for kernels in KERNELS:
        for name, module, build in kernels():
            fn, sig = build()
            row = {"kernel": name, "numba_cuda": _compile(ncuda.compile_ptx, fn, sig)}
            # the same source with the modules' cuda namespace and Numba types rebound to
            # numba-cuda-mlir's (the kernel's device functions are rebuilt with them)
            with _rebound({module, fwd_module, bf16_module, philox_module}, mcuda):
                fn, sig = build()
                row["numba_cuda_mlir"] = _compile(mcuda.compile_ptx, fn, tuple(convert(t, mcuda.types) for t in sig))
            rows.append(row)
            cells = []
            for key in ("numba_cuda", "numba_cuda_mlir"):
                r = row[key]
                cells.append(
                    f"{key} OK {r['seconds']:5.1f} s {r['ptx_bytes'] // 1024:4d} KiB calls={r['calls']}"
                    if r["ok"]
                    else f"{key} FAIL {r['error'][:160]}"
                )
            print(f"{name:32s} " + " | ".join(cells), flush=True)
    ok = sum(r["numba_cuda_mlir"]["ok"] for r in rows)
    print(f"numba-cuda-mlir {getattr(numba_cuda_mlir, '__version__', '?')}: {ok}/{len(rows)} kernels compiled")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"numba_cuda_mlir": getattr(numba_cuda_mlir, "__version__", "?"), "results": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
