"""Decoding (``engine.attention_with_kvcache``, ``backend="cpu"``) against PyTorch (issue 16's table).

    python bench/decode_vs_torch.py [--quick] [--threads N] [--rounds R] [--skip-generate] [--json PATH]

Every figure is a ratio measured in this one run, on the same thread count for both libraries
(``torch.set_num_threads``, ``engine.set_num_threads``; NumPy's BLAS through threadpoolctl):

* decode cases: torch's ``scaled_dot_product_attention`` with one query row on the same cache
  (``enable_gqa=True`` for grouped heads) against the engine on the cache as it is
  (``cache_seqlens = S``, nothing written). Ratio = torch time / engine time.
* streaming bandwidth: the bytes of K and V a decode step at S = 32k reads, per second, against a
  NumPy sum over the same bytes (both arrays), in the same rounds.
* bfloat16 cache: the float32 cache's time / the bfloat16 cache's time at S = 32k.
* ragged paged batch: 16 sequences of 100..8000 keys in a paged cache (page size 64, pages shuffled)
  against torch on the batch padded to the longest sequence with a key-padding mask.
* tiny call: ``engine.scaled_dot_product_attention`` at B = H = 1, L = S = 8, head 16, against torch.
* generation: ``attention-engine generate``'s measurement (GPT-2 small's configuration, 128 tokens).

Timing alternates the libraries: each round runs an untimed call then a block of calls of each
(the order flips every round), and the figure is the median over rounds of the block means. The
load average before and after is recorded: on a shared machine the ratios still compare the two
libraries under the same load, but absolute times (and the bandwidth baseline) are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _block(fn, calls):
    fn()  # untimed: absorbs the other library's spinning pool and warms caches
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def alternate(fns: dict, rounds: int, calls: int) -> dict:
    """Median over ``rounds`` of the mean time of ``calls`` calls, per function, alternating order."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(_block(fns[name], calls))
    return {k: statistics.median(v) for k, v in times.items()}


def _calls_for(seconds_per_call: float, budget: float = 0.05) -> int:
    return max(1, min(200, int(budget / max(seconds_per_call, 1e-7))))


def decode_case(name, B, Hq, Hkv, S, D, rounds, target, cache_dtype="float32"):
    import torch
    import torch.nn.functional as F

    import engine

    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
    kc = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    vc = rng.standard_normal((B, Hkv, S, D)).astype(np.float32)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, kc, vc))

    def run_engine():
        return engine.attention_with_kvcache(q, kc, vc, cache_seqlens=S, backend="cpu")

    def run_torch():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=Hq != Hkv)

    err = float(np.abs(run_engine() - run_torch().numpy()).max())
    calls = _calls_for(_block(run_engine, 1))
    t = alternate({"engine": run_engine, "torch": run_torch}, rounds, calls)
    return {
        "case": name,
        "shape": {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "D": D},
        "engine_s": t["engine"],
        "torch_s": t["torch"],
        "ratio_torch_over_engine": t["torch"] / t["engine"],
        "target": target,
        "met": t["torch"] / t["engine"] >= target,
        "max_abs_diff": err,
    }


def bandwidth_and_bfloat16(rounds, S=32768, H=8, D=64):
    import ml_dtypes

    import engine

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, H, 1, D)).astype(np.float32)
    kc = rng.standard_normal((1, H, S, D)).astype(np.float32)
    vc = rng.standard_normal((1, H, S, D)).astype(np.float32)
    kb, vb = kc.astype(ml_dtypes.bfloat16), vc.astype(ml_dtypes.bfloat16)
    fns = {
        "engine_f32": lambda: engine.attention_with_kvcache(q, kc, vc, cache_seqlens=S, backend="cpu"),
        "engine_bf16": lambda: engine.attention_with_kvcache(q, kb, vb, cache_seqlens=S, backend="cpu"),
        "numpy_sum": lambda: (np.sum(kc), np.sum(vc)),
    }
    calls = _calls_for(_block(fns["engine_f32"], 1))
    t = alternate(fns, rounds, calls)
    nbytes = kc.nbytes + vc.nbytes
    bw_engine, bw_numpy = nbytes / t["engine_f32"], nbytes / t["numpy_sum"]
    return [
        {
            "case": f"decode S={S}: K and V bytes read per second vs a NumPy sum over the same bytes",
            "engine_GBps": bw_engine / 1e9,
            "numpy_sum_GBps": bw_numpy / 1e9,
            "ratio_engine_over_numpy": bw_engine / bw_numpy,
            "target": 0.7,
            "met": bw_engine / bw_numpy >= 0.7,
        },
        {
            "case": f"decode S={S}: bfloat16 cache vs float32 cache",
            "float32_s": t["engine_f32"],
            "bfloat16_s": t["engine_bf16"],
            "speedup": t["engine_f32"] / t["engine_bf16"],
            "target": 1.6,
            "met": t["engine_f32"] / t["engine_bf16"] >= 1.6,
        },
    ]


def ragged_paged_case(rounds, B=16, H=8, D=64, page_size=64):
    import torch
    import torch.nn.functional as F

    import engine

    rng = np.random.default_rng(2)
    seqlens = np.linspace(100, 8000, B).astype(np.int32)
    rng.shuffle(seqlens)
    pages_per = -(-seqlens // page_size)
    total = int(pages_per.sum())
    order = rng.permutation(total).astype(np.int32)
    table = np.zeros((B, int(pages_per.max())), np.int32)
    start = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = order[start : start + n]
        start += n
    kp = rng.standard_normal((total, H, page_size, D)).astype(np.float32)
    vp = rng.standard_normal((total, H, page_size, D)).astype(np.float32)
    q = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    # torch: the same keys gathered into a padded batch with a key-padding mask
    S = int(seqlens.max())
    t_ = np.arange(S)
    pages = table[:, np.minimum(t_ // page_size, table.shape[1] - 1)]
    kpad = np.ascontiguousarray(np.swapaxes(kp[pages, :, t_ % page_size], 1, 2))
    vpad = np.ascontiguousarray(np.swapaxes(vp[pages, :, t_ % page_size], 1, 2))
    mask = torch.from_numpy(t_[None, None, None, :] < seqlens[:, None, None, None])
    tq, tk, tv = (torch.from_numpy(a) for a in (q, kpad, vpad))

    def run_engine():
        return engine.attention_with_kvcache(q, kp, vp, cache_seqlens=seqlens, page_table=table, backend="cpu")

    def run_torch():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)

    err = float(np.abs(run_engine() - run_torch().numpy()).max())
    calls = _calls_for(_block(run_engine, 1))
    t = alternate({"engine": run_engine, "torch": run_torch}, rounds, calls)
    return {
        "case": f"ragged batch of {B} (seqlens 100..8000), paged (page size {page_size}) vs torch on the "
        "padded batch with a mask",
        "engine_s": t["engine"],
        "torch_s": t["torch"],
        "ratio_torch_over_engine": t["torch"] / t["engine"],
        "target": 1.0,
        "met": t["torch"] / t["engine"] >= 1.0,
        "max_abs_diff": err,
    }


def tiny_call_case(rounds):
    import torch
    import torch.nn.functional as F

    import engine

    q = np.random.default_rng(3).standard_normal((1, 1, 8, 16)).astype(np.float32)
    tq = torch.from_numpy(q)
    fns = {
        "engine": lambda: engine.scaled_dot_product_attention(q, q, q),
        "torch": lambda: F.scaled_dot_product_attention(tq, tq, tq),
    }
    t = alternate(fns, rounds, 2000)
    return {
        "case": "tiny call B=1, H=1, L=S=8, head 16: scaled_dot_product_attention (backend auto)",
        "engine_s": t["engine"],
        "torch_s": t["torch"],
        "ratio_torch_over_engine": t["torch"] / t["engine"],
        "target": 0.5,
        "met": t["torch"] / t["engine"] >= 0.5,
    }


def generation_case(threads, rounds, new_tokens):
    from types import SimpleNamespace

    from engine.models import generate

    path = os.path.join(os.path.dirname(HERE), ".generate-bench.json")
    args = SimpleNamespace(
        model="small",
        new_tokens=new_tokens,
        rounds=rounds,
        threads=threads,
        backend="cpu",
        cache_dtype="float32",
        seed=0,
        json=path,
    )
    generate.run(args)
    with open(path) as f:
        rows = json.load(f)["results"]
    os.remove(path)
    for row in rows:
        row["target"] = 1.0
        row["met"] = row["ratio_engine_over_transformers"] >= 1.0
    return rows


def cpu_model() -> str:
    from engine.runtime.machine import cpu_model

    return cpu_model()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no generation: a smoke run")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--json",
        help="where to write the results (default: bench/results/decode-vs-torch-<cpu>-<threads>threads-<date>.json)",
    )
    args = parser.parse_args(argv)

    import numba
    import torch
    from threadpoolctl import threadpool_limits

    import engine

    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    engine.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    load_before = os.getloadavg()
    results = []
    with threadpool_limits(limits=args.threads):
        for S in (128, 4096) if args.quick else (128, 1024, 4096, 32768):
            results.append(decode_case(f"decode B=1, H=8, D=64, S={S}", 1, 8, 8, S, 64, rounds, 1.0))
            print(_line(results[-1]), flush=True)
        results.append(decode_case("decode B=1, Hq=32, Hkv=8, D=128, S=4096 (GQA)", 1, 32, 8, 4096, 128, rounds, 1.0))
        print(_line(results[-1]), flush=True)
        if not args.quick:
            for row in bandwidth_and_bfloat16(rounds):
                results.append(row)
                print(_line(row), flush=True)
        results.append(ragged_paged_case(rounds))
        print(_line(results[-1]), flush=True)
        results.append(tiny_call_case(rounds))
        print(_line(results[-1]), flush=True)
    if not (args.quick or args.skip_generate):
        for row in generation_case(args.threads, 3 if args.rounds > 3 else args.rounds, args.new_tokens):
            results.append(row)
            print(_line(row), flush=True)
    load_after = os.getloadavg()
    meta = {
        "command": "python bench/decode_vs_torch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "rounds": rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    path = args.json
    if path is None:
        slug = re.sub(r"[^a-z0-9]+", "-", meta["cpu"].lower()).strip("-")
        path = os.path.join(HERE, "results", f"decode-vs-torch-{slug}-{args.threads}threads-{meta['date']}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores; written {path}"
    )
    return 0


def _line(row) -> str:
    for key in ("ratio_torch_over_engine", "ratio_engine_over_numpy", "speedup", "ratio_engine_over_transformers"):
        if key in row:
            met = "met" if row["met"] else "NOT met"
            return f"{row['case']}: {key} = {row[key]:.2f} (target {row['target']}: {met})"
    return str(row)


if __name__ == "__main__":
    sys.exit(main())
