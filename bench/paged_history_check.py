"""What the paged-cache history check (issue 27, item 6) adds to ``attention_with_kvcache``'s
validation: a write into a slot that a sequence reads as its history is refused, which costs a
pass over the page table per call.

    python bench/paged_history_check.py [--rounds R] [--json PATH]

For each paged configuration (one new token per sequence, every page live), the validation of
one call is timed with the check and with it replaced by a no-op, alternating within each round;
the figure is the median over rounds of the per-call times. The load average before and after is
recorded (on a shared machine the difference is noisy; the lead re-measures on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import timeit

import numpy as np

import engine.problems.decode as decode
import engine.problems.pages as pages
from engine.runtime.machine import machine_info

CONFIGS = [  # (B, max_pages, page_size): one long sequence; a batch of short pages; a larger batch
    (1, 16, 256),
    (8, 256, 16),
    (64, 128, 32),
]


def _case(B, width, page_size, heads=8, q_heads=32, dim=128):
    k_cache = np.zeros((B * width, heads, page_size, dim), np.float32)
    table = np.arange(B * width, dtype=np.int32).reshape(B, width)
    seqlens = np.full(B, width * page_size - 1, np.int32)
    q = np.zeros((B, q_heads, 1, dim), np.float32)
    new = np.zeros((B, heads, 1, dim), np.float32)
    return dict(
        query=q, k_cache=k_cache, v_cache=k_cache.copy(), key=new, value=new, cache_seqlens=seqlens, page_table=table
    )


def measure(rounds: int) -> list[dict]:
    check = pages.check_no_write_into_history
    rows = []
    for B, width, page_size in CONFIGS:
        case = _case(B, width, page_size)
        call = lambda: decode.validate_decode_args(**case)  # noqa: E731
        times = {"with": [], "without": []}
        try:
            for r in range(rounds):
                for mode in ("with", "without") if r % 2 == 0 else ("without", "with"):
                    pages.check_no_write_into_history = check if mode == "with" else (lambda *a, **k: None)
                    times[mode].append(min(timeit.repeat(call, number=20, repeat=3)) / 20)
        finally:
            pages.check_no_write_into_history = check
        med = {m: statistics.median(t) for m, t in times.items()}
        rows.append(
            {
                "B": B,
                "max_pages": width,
                "page_size": page_size,
                "validate_without_s": med["without"],
                "validate_with_s": med["with"],
                "added_s": med["with"] - med["without"],
            }
        )
        print(
            f"B={B:3d} max_pages={width:4d} page_size={page_size:4d}: validation {med['without'] * 1e6:7.1f} us "
            f"-> {med['with'] * 1e6:7.1f} us (+{(med['with'] - med['without']) * 1e6:.1f} us)"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="write the figures and the machine here")
    args = parser.parse_args()
    before = machine_info()
    rows = measure(args.rounds)
    after = machine_info()
    print(f"{before['cpu']}; load average {before['load_average']} before, {after['load_average']} after")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {**before, "load_average_after": after["load_average"]}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
