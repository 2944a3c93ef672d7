"""How fast a library reads GPT-2 small's weights in a batch-1 decode step, against a streaming read.

A greedy GPT-2 step at batch 1 multiplies one row by every block's four weight matrices and by the
tied output projection: 49 matrix-vector products over 494 MB of float32 weights, read once each
from memory. This times exactly those products (random matrices of GPT-2 small's shapes, in the
layouts ``x @ W`` can read them in, ``x`` one row), with NumPy (its BLAS, on all threads and on
one) on row-major weights, on the memory order ``engine.models.gpt2`` holds them in (column-major
where a product's output is no wider than its input: ``_held_for_one_row``), on transposed
copies, and torch, each after a pause, against ``torch.sum`` over the same bytes; the weight
products bound ``attention-engine generate``'s tokens per second from above whatever attention
costs. Run: ``python bench/gpt2_weight_products.py [--threads 2]``.
"""

import argparse
import time

import numpy as np
import threadpoolctl
import torch

from engine.models.gpt2 import _held_for_one_row
from engine.runtime.machine import cpu_model

#: GPT-2 small: (rows, columns) of c_attn, attn.c_proj, c_fc, mlp.c_proj per block, then wte.T
BLOCK = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
LAYERS, VOCAB = 12, 50257


def _median_s(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    threadpoolctl.threadpool_limits(opts.threads)
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) for s in BLOCK * LAYERS + [(768, VOCAB)]]
    wts = [np.ascontiguousarray(w.T) for w in ws]
    # the names only pick the rule's branch: a block's weight, or the output projection
    held = [_held_for_one_row("transformer.h.0.x.weight" if i < len(ws) - 1 else "wte_t", w) for i, w in enumerate(ws)]
    xs = {n: rng.standard_normal((1, n), dtype=np.float32) for n in (768, 3072)}
    nbytes = sum(w.nbytes for w in ws)
    tw, twt = [torch.from_numpy(w) for w in ws], [torch.from_numpy(w) for w in wts]
    tx = {n: torch.from_numpy(x) for n, x in xs.items()}
    flat = torch.from_numpy(np.concatenate([w.ravel() for w in ws]))
    cases = {
        "numpy x @ W": lambda: [xs[w.shape[0]] @ w for w in ws],
        "numpy x @ W, as the model holds W": lambda: [xs[w.shape[0]] @ w for w in held],
        "numpy W.T @ x (transposed copy)": lambda: [w @ xs[w.shape[1]][0] for w in wts],
        "torch x @ W": lambda: [tx[w.shape[0]] @ w for w in tw],
        "torch.mv(W.T, x)": lambda: [torch.mv(w, tx[w.shape[1]][0]) for w in twt],
        "torch.sum (streaming read)": lambda: flat.sum(),
    }
    print(f"{cpu_model()}, {opts.threads} threads, {nbytes / 1e6:.1f} MB of weights")
    for name, fn in cases.items():
        time.sleep(0.3)
        s = _median_s(fn, opts.rounds)
        print(f"{name:34s} {s * 1e3:7.2f} ms per step  {nbytes / s / 1e9:5.1f} GB/s")
    with threadpoolctl.threadpool_limits(1):
        time.sleep(0.3)
        s = _median_s(cases["numpy x @ W"], opts.rounds)
        print(f"{'numpy x @ W, one BLAS thread':34s} {s * 1e3:7.2f} ms per step  {nbytes / s / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
