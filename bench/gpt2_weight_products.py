"""How fast a library reads GPT-2 small's weights in a batch-1 decode step, against a streaming read.

A greedy GPT-2 step at batch 1 multiplies one row by every block's four weight matrices and by the
tied output projection: 49 matrix-vector products over 494 MB of float32 weights, read once each
from memory. This times exactly those products (random matrices of GPT-2 small's shapes, in the
layouts ``x @ W`` can read them in, ``x`` one row), with NumPy (its BLAS, on all threads and on
one) on row-major weights, on the memory order ``engine.models.gpt2`` holds them in (column-major
where a product's output is no wider than its input: ``_held_for_one_row``), on transposed
copies, and torch, each after a pause, against ``torch.sum`` over the same bytes; the weight
products bound ``attention-engine generate``'s tokens per second from above whatever attention
costs. Then the same products inside the model, per decode step: ``engine.models.gpt2``
generating 64 tokens after a 32-token prompt, less a generation of the prompt alone (random GPT-2
small, batch 1), its products, bias additions, layer norms, GELU and attention each timed where
they run (wall time; the step's rest is the embedding, reshapes, residual adds and the argmax).
Run: ``python bench/gpt2_weight_products.py [--threads 2] [--skip-model]``.
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
    ap.add_argument("--skip-model", action="store_true", help="the isolated products only")
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
    if not opts.skip_model:
        del ws, wts, held, tw, twt, flat
        in_model(opts.threads)


def in_model(threads: int, new_tokens: int = 64) -> None:
    """Where a generation step's time goes inside ``engine.models.gpt2`` (its functions wrapped
    with timers for one generation; the products timed apart from their bias additions)."""
    from collections import defaultdict

    import engine
    import engine.decoding
    import engine.models.gpt2 as gpt2

    engine.set_num_threads(threads)
    _, ours = gpt2.random_gpt2(None, seed=0)
    prompt = [np.random.default_rng(0).integers(1, ours.config.vocab_size, 32).tolist()]
    spent, nbytes = defaultdict(float), defaultdict(int)

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[name] += time.perf_counter() - t
            return out

        return run

    def linear(x, w, b=None):
        t = time.perf_counter()
        y = x @ w  # a decode step of batch 1: gpt2._linear's branch
        spent[f"product {w.shape[0]} x {w.shape[1]}"] += time.perf_counter() - t
        nbytes[f"product {w.shape[0]} x {w.shape[1]}"] += w.nbytes
        t = time.perf_counter()
        y = y if b is None else y + b
        spent["bias additions"] += time.perf_counter() - t
        return y

    saved = gpt2._linear, gpt2._layer_norm, gpt2._gelu_new, engine.decoding.attention_with_kvcache
    ours.generate(prompt, 4)  # compile, warm up
    gpt2._linear, gpt2._layer_norm = linear, timed("layer norms", gpt2._layer_norm)
    gpt2._gelu_new = timed("GELU", gpt2._gelu_new)
    engine.decoding.attention_with_kvcache = timed("attention", saved[3])
    runs = []
    try:
        ours.generate(prompt, 4)
        for n in (1, new_tokens):  # the prompt alone (no decode step), then with new_tokens - 1 steps
            spent.clear()
            nbytes.clear()
            t = time.perf_counter()
            ours.generate(prompt, n)
            runs.append((time.perf_counter() - t, dict(spent), dict(nbytes)))
    finally:
        gpt2._linear, gpt2._layer_norm, gpt2._gelu_new, engine.decoding.attention_with_kvcache = saved
    # per decode step: the difference of the two generations over their difference in steps
    steps = new_tokens - 1
    total = (runs[1][0] - runs[0][0]) / steps
    spent = {k: (v - runs[0][1].get(k, 0.0)) / steps for k, v in runs[1][1].items()}
    nbytes = {k: (v - runs[0][2].get(k, 0)) / steps for k, v in runs[1][2].items()}
    print(f"\nin the model, batch 1, a 32-token prompt: {total * 1e3:.2f} ms per decode step")
    for name in sorted(spent):
        rate = f"   {nbytes[name] / spent[name] / 1e9:5.1f} GB/s" if name in nbytes else ""
        print(f"  {name:34s} {spent[name] * 1e3:6.2f} ms{rate}")
    products = sum(spent[k] for k in nbytes)
    all_rate = sum(nbytes.values()) / products / 1e9
    print(f"  {'products, all':34s} {products * 1e3:6.2f} ms   {all_rate:5.1f} GB/s")
    rest = total - sum(spent.values())
    print(f"  {'the rest of the step':34s} {rest * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
