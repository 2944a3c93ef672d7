"""bfloat16 prefill at head widths that are and are not multiples of 32 (the 16-bit tile products'
unit: other widths are padded with zero features), the ``cpu`` backend against torch's SDPA in the
same dtype, each library in its own loop after a pause. Batch 1, 8 heads, L = S.

Run: ``python bench/head_widths_16bit.py [--threads 2] [--rounds 7]``.
"""

import argparse
import statistics
import time
import timeit

import ml_dtypes
import numpy as np
import torch

import engine
from engine.runtime.machine import cpu_model

CASES = [(80, 1024), (80, 2048), (64, 1024), (112, 1024)]


def _median_ms(fn, rounds: int) -> float:
    """Median of ``rounds`` single calls after two untimed ones (compile, tiles, warm caches)."""
    fn()
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=rounds)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    engine.set_num_threads(opts.threads)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    print(f"{cpu_model()}, {opts.threads} threads, bfloat16, batch 1, 8 heads")
    for E, L in CASES:
        q, k, v = (rng.standard_normal((1, 8, L, E)).astype(bf16) for _ in range(3))
        tq, tk, tv = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) for a in (q, k, v))
        for causal in (False, True):
            time.sleep(0.3)
            te = _median_ms(lambda: engine.scaled_dot_product_attention(q, k, v, is_causal=causal), opts.rounds)
            time.sleep(0.3)
            tt = _median_ms(
                lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal), opts.rounds
            )
            print(
                f"head {E:3d}, L = S = {L:4d}, causal {causal!s:5}: engine {te:7.2f} ms, "
                f"torch {tt:7.2f} ms, ratio {tt / te:.2f}"
            )


if __name__ == "__main__":
    main()
