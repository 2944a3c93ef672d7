"""The ``cuda`` backend against torch on one GPU: forward, backward and KV-cache decoding.

Needs a CUDA GPU, a CUDA build of torch and numba-cuda (``pip install -e ".[cuda]"``). Both sides
get the same torch CUDA tensors (the engine reads them in place and launches on torch's current
stream); each case is timed with CUDA events, alternating engine and torch, median of rounds.

* **forward**: ``engine.scaled_dot_product_attention(backend="cuda")`` against
  ``torch.nn.functional.scaled_dot_product_attention`` (torch picks its own kernel: flash or
  memory-efficient on tensor cores in float16/bfloat16; the engine has no tensor-core path, as
  Numba exposes no MMA intrinsics, so expect it to lose there).
* **backward**: ``engine.scaled_dot_product_attention_backward(backend="cuda")`` from the forward's
  ``out`` and ``lse`` against ``torch.autograd.grad`` through torch's SDPA (its backward alone:
  the forward is run once outside the timing, ``retain_graph=True``).
* **decode**: ``engine.attention_with_kvcache(backend="cuda")``, one query row per sequence
  against a full cache, against torch SDPA on the same cache slice (``enable_gqa=True``). The
  figure of merit is bandwidth: cache bytes read per second, as a fraction of the GPU's nominal
  peak (``--peak-gbps``, known for H100/H200) and of a device-to-device copy measured in the same
  run.

Every case also compares the results with torch's (``max_abs_diff``; ``ok`` when within the
dtype's tolerance, relative to the largest reference value). A case the engine refuses
(``engine.NotSupportedError``) is recorded with its reason; any other error is recorded too and
makes the exit status 1.

    python bench/gpu_vs_torch.py --check --json bench/results/gpu-<device>-<date>.json  # issue 20's targets
    python bench/gpu_vs_torch.py --quick              # a few small cases
    python bench/gpu_vs_torch.py                      # the full grid (tens of minutes)

``--check`` is what ``bench/gpu_check.sh`` runs: the targets of issue 20 (B=1, H=8, L=4096, head 64
forward and backward in float32, float16, bfloat16, causal or not; decode at S=32k with float32,
float16 and bfloat16 caches), sized to finish in about two minutes on an H100/H200.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
import traceback

#: nominal HBM bandwidth (GB/s) by device-name substring, for the decode rows
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}
#: FP32 (non-tensor) peak TFLOP/s by device-name substring
PEAK_TFLOPS = {"H200": 67.0, "H100 PCIe": 51.0, "H100": 67.0, "A100": 19.5}
#: max |engine - torch| / max(1, max |torch|) accepted per dtype (one rounding of the storage
#: dtype and float32 accumulation in a different order; bfloat16 keeps 8 bits)
TOLERANCE = {"float32": 2e-4, "float16": 4e-3, "bfloat16": 3e-2}


def _lookup(table: dict, device: str, default: float) -> float:
    for key, value in table.items():
        if key in device:
            return value
    return default


def _time(fn, torch, inner: int) -> float:
    if not torch.cuda.is_available():  # --device cpu (a dry run of this script without a GPU)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0 / inner


def _measure(ours, theirs, torch, rounds: int, work_s: float) -> tuple[float, float]:
    """Median seconds per call of each, alternating (drift hits both), after one warm call each
    (the engine's first call compiles its kernel)."""
    ours()
    theirs()
    _sync(torch)
    first = _time(ours, torch, 1)
    inner = max(1, min(200, int(work_s / max(first, 1e-6))))
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(_time(ours, torch, inner))
        t_theirs.append(_time(theirs, torch, inner))
    return statistics.median(t_ours), statistics.median(t_theirs)


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _host32(x):
    """A result as a float32 NumPy array (torch tensors on any device, NumPy arrays of any dtype)."""
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x).astype(np.float32)


def _rel_diff(torch, ours, theirs) -> float:
    """max |a - b| / max(1, max |b|) over matching results."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        a, b = _host32(a), _host32(b)
        worst = max(worst, float(abs(a - b).max()) / max(1.0, float(abs(b).max())))
    return worst


def copy_bandwidth_gbps(torch, device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(torch)
    t = min(_time(lambda: dst.copy_(src), torch, 10) for _ in range(3))
    return 2 * nbytes / t / 1e9


def forward_case(engine, torch, batch, heads, hd, L, causal, dtype, args):
    q, k, v = (torch.randn(batch, heads, L, hd, device=args.device, dtype=dtype) for _ in range(3))

    def ours():
        return engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=args.backend)

    def theirs():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    diff = _rel_diff(torch, [ours()], [theirs()])
    mo, mt = _measure(ours, theirs, torch, args.rounds, args.work_s)
    flops = 4 * batch * heads * L * L * hd * (0.5 if causal else 1.0)
    return {"engine_s": mo, "torch_s": mt, "flops": flops, "max_rel_diff": diff}


def backward_case(engine, torch, batch, heads, hd, L, causal, dtype, args):
    q, k, v, g = (torch.randn(batch, heads, L, hd, device=args.device, dtype=dtype) for _ in range(4))
    out, lse = engine.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True, backend=args.backend)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    ot = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def ours():
        return engine.scaled_dot_product_attention_backward(
            g, q, k, v, out, lse, is_causal=causal, backend=args.backend
        )

    def theirs():
        return torch.autograd.grad(ot, (qt, kt, vt), g, retain_graph=True)

    diff = _rel_diff(torch, ours(), theirs())
    mo, mt = _measure(ours, theirs, torch, args.rounds, args.work_s)
    # FlashAttention's count: the backward does 5 of the forward's 2 products (2.5x its flops)
    flops = 10 * batch * heads * L * L * hd * (0.5 if causal else 1.0)
    return {"engine_s": mo, "torch_s": mt, "flops": flops, "max_rel_diff": diff}


def decode_case(engine, torch, batch, hq, hkv, hd, S, dtype, args):
    import numpy as np

    kc, vc = (torch.randn(batch, hkv, S, hd, device=args.device, dtype=dtype) for _ in range(2))
    q = torch.randn(batch, hq, 1, hd, device=args.device, dtype=dtype)
    seqlens = np.full(batch, S, dtype=np.int32)  # full caches, nothing appended: timing repeats

    def ours():
        return engine.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, backend=args.backend)

    def theirs():
        return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    diff = _rel_diff(torch, [ours()], [theirs()])
    mo, mt = _measure(ours, theirs, torch, args.rounds, args.work_s)
    nbytes = 2 * batch * hkv * S * hd * kc.element_size()
    return {"engine_s": mo, "torch_s": mt, "bytes": nbytes, "max_rel_diff": diff}


def grids(args, dtypes):
    """(kind, shape parameters) of each case."""
    if args.check:
        fwd = [(1, 8, 64, 4096, c) for c in (False, True)]
        dec = [(4, 32, 8, 128, 32768)]
    elif args.smoke:  # tiny: a dry run of the script itself (with --device cpu in the test suite)
        fwd = [(1, 2, 16, 64, c) for c in (False, True)]
        dec = [(2, 4, 2, 16, 128)]
    elif args.quick:
        fwd = [(1, 8, 64, L, c) for L in (1024, 2048) for c in (False, True)]
        dec = [(1, 32, 8, 128, 4096)]
    else:  # batch 1-4, 8-32 heads, head size 64/128, L = 1k..16k
        fwd = list(itertools.product([1, 4], [8, 32], [64, 128], [1024, 4096, 16384], [False, True]))
        dec = list(itertools.product([1, 8], [32], [8], [128], [4096, 32768]))
    for kind in args.only:
        shapes = dec if kind == "decode" else fwd
        for shape, dtype in itertools.product(shapes, dtypes):
            yield kind, shape, dtype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--check", action="store_true", help="issue 20's target cases (about two minutes)")
    size.add_argument("--quick", action="store_true", help="a few small cases")
    size.add_argument("--smoke", action="store_true", help="tiny cases: checks the script, measures nothing")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a dry run without a GPU (the cpu backend against torch on the CPU, wall-clock timing)",
    )
    ap.add_argument("--only", default="forward,backward,decode", help="comma-separated: forward, backward, decode")
    ap.add_argument(
        "--dtypes", default="float32,float16,bfloat16", help="comma-separated storage dtypes (default: all three)"
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work-s", type=float, default=0.02, help="GPU seconds per timed round (sets the repeats)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's FP32 peak (default: by device name)")
    ap.add_argument("--peak-gbps", type=float, help="the GPU's memory bandwidth (default: by device name)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.backend = args.device  # the engine backend that takes this device's tensors
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if sorted(set(dtypes) - {"float32", "float16", "bfloat16"}) or not dtypes:
        ap.error(f"--dtypes takes float32, float16 and bfloat16, got {args.dtypes!r}")
    if sorted(set(args.only) - {"forward", "backward", "decode"}) or not args.only:
        ap.error(f"--only takes forward, backward and decode, got {','.join(args.only)!r}")

    import torch

    import engine

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU visible to torch: nothing to measure", file=sys.stderr)
            return 2
        why = engine.get_backend("cuda").unavailable_reason()
        if why:
            print(f"the engine's cuda backend is unavailable: {why}", file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name()
    else:
        import platform

        device = "cpu " + (platform.processor() or platform.machine())
    peak_tflops = args.peak_tflops or _lookup(PEAK_TFLOPS, device, 67.0)
    peak_gbps = args.peak_gbps or _lookup(PEAK_GBPS, device, 3350.0)
    copy_gbps = (
        copy_bandwidth_gbps(torch, args.device, 1 << (30 if args.device == "cuda" else 26))
        if "decode" in args.only
        else None
    )
    if copy_gbps:
        print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s (nominal peak {peak_gbps:.0f})", flush=True)

    rows, failures = [], 0
    for kind, shape, dtype in grids(args, dtypes):
        tdt = getattr(torch, dtype)
        row = {"kind": kind, "dtype": dtype}
        if kind == "decode":
            row.update(zip(("batch", "q_heads", "kv_heads", "head_dim", "S"), shape))
        else:
            row.update(zip(("batch", "heads", "head_dim", "L", "causal"), shape))
        started = time.perf_counter()
        try:
            fn = {"forward": forward_case, "backward": backward_case, "decode": decode_case}[kind]
            row.update(fn(engine, torch, *shape, tdt, args))
        except engine.NotSupportedError as exc:
            row["refused"] = str(exc).splitlines()[0]
            failures += args.check  # a target case that is not measured fails the check
        except torch.cuda.OutOfMemoryError:
            row["refused"] = "out of GPU memory"
            failures += args.check
        except Exception as exc:  # recorded, and the run goes on to the next case
            failures += 1
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()[-3000:]
        row["wall_s"] = time.perf_counter() - started
        if "engine_s" in row:
            row["ratio"] = row["torch_s"] / row["engine_s"]  # > 1: the engine is faster
            row["ok"] = row["max_rel_diff"] <= TOLERANCE[dtype]
            failures += not row["ok"]
            if kind == "decode":
                row["engine_gbps"] = row["bytes"] / row["engine_s"] / 1e9
                row["torch_gbps"] = row["bytes"] / row["torch_s"] / 1e9
                row["peak_fraction"] = row["engine_gbps"] / peak_gbps
                row["copy_fraction"] = row["engine_gbps"] / copy_gbps
                extra = f"{row['engine_gbps']:7.0f} GB/s ({100 * row['peak_fraction']:4.1f}% of peak)"
            else:
                row["engine_tflops"] = row["flops"] / row["engine_s"] / 1e12
                row["fp32_peak_fraction"] = row["engine_tflops"] / peak_tflops
                extra = f"{row['engine_tflops']:6.2f} TFLOP/s ({100 * row['fp32_peak_fraction']:4.1f}% FP32 peak)"
            status = (
                f"engine {row['engine_s'] * 1e3:8.3f} ms  torch {row['torch_s'] * 1e3:8.3f} ms  "
                f"torch/engine {row['ratio']:5.2f}  {extra}  diff {row['max_rel_diff']:.1e}"
                + ("" if row["ok"] else "  OVER TOLERANCE")
            )
        else:
            status = "refused: " + row["refused"] if "refused" in row else "ERROR: " + row["error"]
        label = " ".join(
            f"{k}={v}"
            for k, v in row.items()
            if k in ("batch", "heads", "q_heads", "kv_heads", "head_dim", "L", "S", "causal")
        )
        print(f"{kind:8s} {dtype:8s} {label:45s} {status}", flush=True)
        rows.append(row)
        if args.json:  # after every case: a run stopped by a time limit keeps what it measured
            _write_json(args, argv, rows, device, peak_tflops, peak_gbps, copy_gbps)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failures else 0


def _write_json(args, argv, rows, device, peak_tflops, peak_gbps, copy_gbps):
    import torch

    meta = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": " ".join(["python", "bench/gpu_vs_torch.py"] + list(argv if argv is not None else sys.argv[1:])),
        "peak_tflops_fp32": peak_tflops,
        "peak_gbps": peak_gbps,
        "copy_gbps": copy_gbps,
        "rounds": args.rounds,
        "tolerance": TOLERANCE,
        "ratio": "torch_s / engine_s (> 1: the engine is faster)",
    }
    with open(args.json, "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
