"""Issue 8's figures: what score_mod / mask_mod cost on the cpu backend, against the built-in paths.

    python bench/mods_vs_builtin.py [--quick] [--json PATH]

float32, batch 1, 8 heads, head size 64, 2 threads. Each pair runs in alternating blocks (one
untimed call, then the mean of 3), the order flipping every round; the figure is the ratio of
the medians, measured in the same run. Block masks are built once, outside the timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import engine
from variants.alibi import alibi_bias, alibi_slopes
from variants.sliding_window import window_mask
from variants.softcap import tanh_softcap

HEADS, E = 8, 64


def causal_mask(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _inputs(L, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, HEADS, L, E)).astype(np.float32) for _ in range(3)]


def alternate(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function, timed in alternating blocks."""
    for fn in fns.values():
        fn()  # compile / warm
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fns[name]()
            t = time.perf_counter()
            for _ in range(3):
                fns[name]()
            times[name].append((time.perf_counter() - t) / 3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L = 1024 and 4096 instead of 4096 and 16384")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    engine.set_num_threads(min(2, engine.get_num_threads()))
    L, L_long, w = (1024, 4096, 256) if args.quick else (4096, 16384, 256)
    sdpa = engine.scaled_dot_product_attention
    rows = []

    q, k, v = _inputs(L)
    causal_bm = engine.create_block_mask(causal_mask, None, None, L, L)
    slopes = alibi_slopes(HEADS).astype(np.float32)
    t = alternate(
        {
            "plain": lambda: sdpa(q, k, v, backend="cpu"),
            "is_causal": lambda: sdpa(q, k, v, is_causal=True, backend="cpu"),
            "causal mask_mod (block mask reused)": lambda: sdpa(q, k, v, block_mask=causal_bm, backend="cpu"),
            "causal mask_mod (block mask per call)": lambda: sdpa(q, k, v, mask_mod=causal_mask, backend="cpu"),
            "alibi score_mod": lambda: sdpa(q, k, v, score_mod=alibi_bias, mod_args=(slopes,), backend="cpu"),
            "softcap score_mod (cap 50)": lambda: sdpa(
                q, k, v, score_mod=tanh_softcap, mod_args=(np.float32(50),), backend="cpu"
            ),
        },
        args.rounds,
    )
    for name, base, target in (
        ("causal mask_mod (block mask reused)", "is_causal", 1.10),
        ("causal mask_mod (block mask per call)", "is_causal", 1.10),
        ("alibi score_mod", "plain", 1.15),
        ("softcap score_mod (cap 50)", "plain", 1.15),
    ):
        rows.append(
            {
                "case": name,
                "L": L,
                "ms": t[name] * 1e3,
                "baseline": base,
                "baseline_ms": t[base] * 1e3,
                "cost": t[name] / t[base],
                "target": f"<= {target}",
                "met": t[name] / t[base] <= target,
            }
        )

    q, k, v = _inputs(L_long)
    window_bm = engine.create_block_mask(window_mask, None, None, L_long, L_long, mod_args=(w, 0))
    window2_bm = engine.create_block_mask(window_mask, None, None, L_long, L_long, mod_args=(2 * w, 0))
    t = alternate(
        {
            "full": lambda: sdpa(q, k, v, backend="cpu"),
            f"window {w}": lambda: sdpa(q, k, v, block_mask=window_bm, backend="cpu"),
            f"window {2 * w}": lambda: sdpa(q, k, v, block_mask=window2_bm, backend="cpu"),
        },
        max(3, args.rounds // 2),
    )
    for name in (f"window {w}", f"window {2 * w}"):
        rows.append(
            {
                "case": f"sliding {name}",
                "L": L_long,
                "ms": t[name] * 1e3,
                "baseline": "full",
                "baseline_ms": t["full"] * 1e3,
                "cost": t[name] / t["full"],
                "tiles_visited": (window_bm if name.endswith(str(w)) else window2_bm).density,
            }
        )
    rows.append(
        {
            "case": f"window {2 * w} / window {w}",
            "L": L_long,
            "cost": t[f"window {2 * w}"] / t[f"window {w}"],
            "note": "proportional to L*w predicts about 2",
        }
    )

    print(f"{'case':<40}{'L':>7}{'ms':>10}{'baseline':>12}{'base ms':>10}{'cost':>8}  target")
    for r in rows:
        print(
            f"{r['case']:<40}{r['L']:>7}{r.get('ms', float('nan')):>10.1f}{r.get('baseline', ''):>12}"
            f"{r.get('baseline_ms', float('nan')):>10.1f}{r['cost']:>8.3f}  "
            f"{r.get('target', r.get('note', ''))} {'met' if r.get('met') else ('NOT met' if 'met' in r else '')}"
            + (f" tiles visited {r['tiles_visited']:.3f}" if "tiles_visited" in r else "")
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "command": "python bench/mods_vs_builtin.py" + (" --quick" if args.quick else ""),
                    "threads": engine.get_num_threads(),
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "rows": rows,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
