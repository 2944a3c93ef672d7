"""What a call with a mod pays per call on a call plan's cached path: the mods' bounds probe
(``engine.problems.mod_bounds``: a memo lookup once a plan exists) and the rest of the path. A tiny
``scaled_dot_product_attention`` and a decode step, each with a per-head bias ``score_mod``, one
kernel thread, medians of blocks of calls. Compare two checkouts by running this in each.

Run: ``python bench/mod_probe_cost.py [--calls 2000] [--rounds 7]``.
"""

import argparse
import statistics
import timeit

import numpy as np

import engine
from engine.runtime.machine import cpu_model


def head_bias(score, b, h, q_idx, kv_idx, bias):
    return score + bias[h]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed block")
    ap.add_argument("--rounds", type=int, default=7, help="timed blocks")
    opts = ap.parse_args(argv)
    engine.set_num_threads(1)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 8, 16)).astype(np.float32)
    qd = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
    k_cache, v_cache = np.zeros((1, 8, 256, 64), np.float32), np.zeros((1, 8, 256, 64), np.float32)
    one, eight = np.ones(1, np.float32), np.ones(8, np.float32)
    cases = {
        "scaled_dot_product_attention (1, 1, 8, 16) + score_mod": lambda: engine.scaled_dot_product_attention(
            q, q, q, score_mod=head_bias, mod_args=(one,), backend="cpu"
        ),
        "decode step B=1 H=8 D=64, S=100 + score_mod": lambda: engine.attention_with_kvcache(
            qd, k_cache, v_cache, cache_seqlens=100, score_mod=head_bias, mod_args=(eight,), backend="cpu"
        ),
    }
    print(f"{cpu_model()}, 1 kernel thread, {engine.__file__}")
    for name, fn in cases.items():
        for _ in range(200):  # compile, plan, memo
            fn()
        us = statistics.median(timeit.repeat(fn, number=opts.calls, repeat=opts.rounds)) / opts.calls * 1e6
        print(f"{name:58s} {us:6.1f} us a call")


if __name__ == "__main__":
    main()
