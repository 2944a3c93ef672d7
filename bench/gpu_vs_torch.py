"""The ``cuda`` backend against ``torch.nn.functional.scaled_dot_product_attention`` on one GPU.

Needs a CUDA GPU, a CUDA build of torch and numba-cuda (``pip install -e ".[cuda]"``). Both sides
get the same torch CUDA tensors (the engine reads them in place and launches on torch's current
stream); each case is timed with CUDA events, alternating engine and torch, median of rounds.
float16 and bfloat16 compare against torch's own kernel choice (its flash kernel on tensor cores);
the engine's kernel has no tensor-core path (Numba exposes no MMA intrinsics), so expect it to lose
there.

    python bench/gpu_vs_torch.py --json bench/results/gpu-<device>-<date>.json   # the issue's grid
    python bench/gpu_vs_torch.py --quick                                          # a few cases

It prints one row per case: times, the ratio engine/torch (< 1: engine faster), the engine's
achieved FP32 TFLOP/s (causal cases count half the products) and its fraction of ``--peak-tflops``
(the GPU's FP32 peak, default 67 for an H100 SXM), and the max abs difference from torch.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys


def _time(fn, torch, rounds: int, inner: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0 / inner)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few small cases instead of the grid")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--peak-tflops", type=float, default=67.0, help="the GPU's FP32 peak")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--dtypes",
        default="float32,float16,bfloat16",
        help="comma-separated storage dtypes to measure (default: all three)",
    )
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = sorted(set(dtypes) - {"float32", "float16", "bfloat16"})
    if bad or not dtypes:
        ap.error(f"--dtypes takes float32, float16 and bfloat16, got {args.dtypes!r}")

    import torch

    import engine

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to measure", file=sys.stderr)
        return 2
    why = engine.get_backend("cuda").unavailable_reason()
    if why:
        print(f"the engine's cuda backend is unavailable: {why}", file=sys.stderr)
        return 2

    if args.quick:
        grid = list(itertools.product([1], [8], [64], [1024, 2048], [False, True], dtypes))
    else:  # the grid: batch 1-4, 8-32 heads, head size 64/128, L = 1k..16k
        grid = list(itertools.product([1, 4], [8, 32], [64, 128], [1024, 4096, 16384], [False, True], dtypes))
    device = torch.cuda.get_device_name()
    rows = []
    for batch, heads, hd, L, causal, dtype in grid:
        tdt = getattr(torch, dtype)
        try:
            q, k, v = (torch.randn(batch, heads, L, hd, device="cuda", dtype=tdt) for _ in range(3))
        except torch.cuda.OutOfMemoryError:
            continue

        def ours():
            return engine.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cuda")

        def theirs():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        diff = float((ours().float() - theirs().float()).abs().max())  # also compiles and warms
        torch.cuda.synchronize()
        flops = 4 * batch * heads * L * L * hd * (0.5 if causal else 1.0)
        inner = max(1, int(2e11 // flops))
        t_ours, t_theirs = [], []
        for _ in range(args.rounds):  # alternate, so drift hits both sides
            t_ours += _time(ours, torch, 1, inner)
            t_theirs += _time(theirs, torch, 1, inner)
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        row = {
            "batch": batch,
            "heads": heads,
            "head_dim": hd,
            "L": L,
            "causal": causal,
            "dtype": dtype,
            "engine_s": mo,
            "torch_s": mt,
            "ratio": mo / mt,
            "engine_tflops": flops / mo / 1e12,
            "fp32_peak_fraction": flops / mo / 1e12 / args.peak_tflops,
            "max_abs_diff": diff,
        }
        rows.append(row)
        print(
            f"B={batch} H={heads:2d} D={hd:3d} L={L:5d} causal={causal!s:5} {dtype:7s} "
            f"engine {mo * 1e3:9.3f} ms  torch {mt * 1e3:9.3f} ms  ratio {mo / mt:6.2f}  "
            f"{row['engine_tflops']:6.2f} TFLOP/s ({100 * row['fp32_peak_fraction']:4.1f}% of FP32 peak)  "
            f"max|diff| {diff:.2e}",
            flush=True,
        )
        q = k = v = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()
    if args.json:
        meta = {
            "device": device,
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "command": " ".join(["python", "bench/gpu_vs_torch.py"] + (argv or sys.argv[1:])),
            "peak_tflops": args.peak_tflops,
            "rounds": args.rounds,
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
