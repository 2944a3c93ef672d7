"""GPT-2 greedy generation with the weights as ``engine.models.gpt2`` holds them against all row-major.

``engine.models.gpt2`` holds a block's weight column-major where the product's output is no wider
than its input (``_held_for_one_row``). This builds GPT-2 small (random weights, no download),
copies the model with every weight row-major, checks both give the same tokens, and times
batch-1 greedy generation with each, alternating (the order flips every round), each run after a
pause and a two-token warm-up; prints the median tokens per second: ``--new-tokens`` tokens over
the time of a ``generate`` call making one more (the first comes from the 16-token prompt's
prefill, which the time includes).
Run: ``python bench/gpt2_weight_layout.py [--threads 2] [--rounds 12]``; with
``OPENBLAS_CORETYPE=Haswell`` (NumPy's OpenBLAS with AVX2 kernels) for another CPU's kernels.
"""

import argparse
import copy
import time

import numpy as np
import threadpoolctl

from engine.models.gpt2 import random_gpt2
from engine.runtime.machine import cpu_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=32)
    opts = ap.parse_args(argv)
    threadpoolctl.threadpool_limits(opts.threads)
    _, held = random_gpt2(None, seed=0)
    rows = copy.copy(held)
    rows.p = {k: np.ascontiguousarray(v) for k, v in held.p.items()}
    prompt = [list(range(1, 17))]
    a, b = rows.generate(prompt, 8), held.generate(prompt, 8)
    assert (a.tokens == b.tokens).all()
    info = threadpoolctl.threadpool_info()
    print(f"{cpu_model()}, {opts.threads} threads, BLAS {[(i['internal_api'], i.get('architecture')) for i in info]}")
    print(f"same tokens; logits differ by {np.abs(a.logits - b.logits).max():.2g}")
    models = {"all row-major": rows, "as held": held}
    got = {name: [] for name in models}
    for r in range(opts.rounds):
        for name in list(models)[:: 1 if r % 2 else -1]:
            time.sleep(0.3)
            models[name].generate(prompt, 2)
            t = time.perf_counter()
            models[name].generate(prompt, opts.new_tokens + 1)
            got[name].append(opts.new_tokens / (time.perf_counter() - t))
    for name, v in got.items():
        print(f"{name:14s} median {np.median(v):5.1f} tokens/s (min {min(v):.1f}, max {max(v):.1f})")


if __name__ == "__main__":
    main()
