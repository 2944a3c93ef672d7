"""Serving-grade attention (issue 31's speed goals), ``backend="cpu"``, on one thread count.

    python bench/serving_vs_torch.py [--threads N] [--rounds R] [--quick] [--json PATH]

* varlen: a packed batch of 16 sequences of lengths 1 to 512 (``np.linspace(1, 512, 16)``,
  shuffled), ``engine.varlen_attention`` against a loop of torch's
  ``scaled_dot_product_attention`` over the sequences (each given ready as a (1, H, L, E) view, so
  the loop pays no packing). Causal (torch's top-left equals the bottom-right alignment when
  len_q = len_k), float32. Target: torch loop time / engine time >= 1.5. Also measured, for
  information: the same batch without causal, and a GQA batch (32 query heads on 8, head 128).
* mixed decode + prefill: 8 sequences decoding one token (caches of 100 to 4000 entries) and 2
  sequences prefilling a 256-token chunk (at 0 and 1000 cached entries), in one
  ``attention_with_kvcache(..., cu_seqlens_q=)`` call, against the separate calls it replaces
  (one decode call for the 8, one call for the 2 chunks: the same caches, views of them), both the
  engine's. Contiguous and paged (pages of 64) caches. Target: separate / mixed >= 1.0.

Every figure is a ratio of two things measured in the same rounds, alternating (each round runs
an untimed call then a block of calls of each, the order flipping every round; the median over
rounds of the block means), on the same thread count for both libraries
(``torch.set_num_threads``, ``engine.set_num_threads``, NumPy's BLAS through threadpoolctl). The
load average before and after is recorded: on a shared machine the ratios compare the two sides
under the same load, absolute times are noisy. Results go to
``bench/results/serving-vs-torch-<threads>threads-<cpu>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_vs_torch import alternate  # noqa: E402  (bench/ is not a package on sys.path)

from engine.runtime.machine import cpu_info, result_file_name  # noqa: E402


def varlen_case(name, lens, Hq, H, E, causal, rounds, calls, target):
    import torch
    import torch.nn.functional as F

    import engine

    rng = np.random.default_rng(0)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = rng.standard_normal((cu[-1], Hq, E), dtype=np.float32)
    k = rng.standard_normal((cu[-1], H, E), dtype=np.float32)
    v = rng.standard_normal((cu[-1], H, E), dtype=np.float32)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    seqs = [tuple(t[cu[b] : cu[b + 1]].transpose(0, 1)[None] for t in (tq, tk, tv)) for b in range(len(lens))]

    def run_engine():
        return engine.varlen_attention(q, k, v, cu, cu, is_causal=causal, backend="cpu")

    def run_torch():
        with torch.no_grad():
            return [F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=Hq != H) for a, b, c in seqs]

    # the same numbers (the loop's outputs packed back), before timing
    want = torch.cat([o[0].transpose(0, 1) for o in run_torch()]).numpy()
    err = float(np.abs(run_engine() - want).max())
    t = alternate({"engine": run_engine, "torch": run_torch}, rounds, calls)
    ratio = t["torch"] / t["engine"]
    return {
        "case": name,
        "lengths": [int(x) for x in lens],
        "engine_s": t["engine"],
        "torch_loop_s": t["torch"],
        "ratio_torch_over_engine": ratio,
        "max_abs_diff": err,
        "target": target,
        "met": None if target is None else ratio >= target,
    }


def mixed_case(name, page_size, rounds, calls):
    import engine

    rng = np.random.default_rng(1)
    Hq, Hkv, D, S_max = 32, 8, 128, 4608
    decode_seqlens = np.linspace(100, 4000, 8).astype(np.int32)
    chunk, chunk_seqlens = 256, np.array([0, 1000], np.int32)
    seqlens = np.concatenate([decode_seqlens, chunk_seqlens])
    lens = np.array([1] * 8 + [chunk] * 2)
    B = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = rng.standard_normal((cu[-1], Hq, D), dtype=np.float32)
    k_new = rng.standard_normal((cu[-1], Hkv, D), dtype=np.float32)
    v_new = rng.standard_normal((cu[-1], Hkv, D), dtype=np.float32)
    if page_size is None:
        k_cache = rng.standard_normal((B, Hkv, S_max, D), dtype=np.float32)
        v_cache = rng.standard_normal((B, Hkv, S_max, D), dtype=np.float32)
        table = None
    else:
        per = S_max // page_size
        k_cache = rng.standard_normal((B * per, Hkv, page_size, D), dtype=np.float32)
        v_cache = rng.standard_normal((B * per, Hkv, page_size, D), dtype=np.float32)
        table = rng.permutation(B * per).astype(np.int32).reshape(B, per)

    def caches(rows):  # contiguous: a slice of sequences is a view; paged: the same pool
        if table is None:
            return dict(k_cache=k_cache[rows], v_cache=v_cache[rows])
        return dict(k_cache=k_cache, v_cache=v_cache, page_table=table[rows])

    dec, pre = slice(0, 8), slice(8, 10)
    dec_rows, pre_rows = slice(0, 8), slice(8, 8 + 2 * chunk)
    uniform = {
        "decode": dict(
            query=q[dec_rows][:, :, None, :],
            key=k_new[dec_rows][:, :, None, :],
            value=v_new[dec_rows][:, :, None, :],
            cache_seqlens=seqlens[dec],
            **caches(dec),
        ),
        "prefill": dict(
            query=np.ascontiguousarray(q[pre_rows].reshape(2, chunk, Hq, D).transpose(0, 2, 1, 3)),
            key=np.ascontiguousarray(k_new[pre_rows].reshape(2, chunk, Hkv, D).transpose(0, 2, 1, 3)),
            value=np.ascontiguousarray(v_new[pre_rows].reshape(2, chunk, Hkv, D).transpose(0, 2, 1, 3)),
            cache_seqlens=seqlens[pre],
            **caches(pre),
        ),
    }
    packed = dict(query=q, key=k_new, value=v_new, cache_seqlens=seqlens, cu_seqlens_q=cu, **caches(slice(0, B)))

    def run_mixed():
        return engine.attention_with_kvcache(**packed, backend="cpu")

    def run_separate():
        a = engine.attention_with_kvcache(**uniform["decode"], backend="cpu")
        b = engine.attention_with_kvcache(**uniform["prefill"], backend="cpu")
        return a, b

    a, b = run_separate()
    want = np.concatenate([a[:, :, 0], b.transpose(0, 2, 1, 3).reshape(2 * chunk, Hq, D)])
    err = float(np.abs(run_mixed() - want).max())
    t = alternate({"mixed": run_mixed, "separate": run_separate}, rounds, calls)
    ratio = t["separate"] / t["mixed"]
    return {
        "case": name,
        "mixed_s": t["mixed"],
        "separate_s": t["separate"],
        "ratio_separate_over_mixed": ratio,
        "max_abs_diff": err,
        "target": 1.0,
        "met": ratio >= 1.0,
    }


def _line(row) -> str:
    for key in ("ratio_torch_over_engine", "ratio_separate_over_mixed"):
        if key in row:
            target = "" if row["target"] is None else f" (target {row['target']}: {'met' if row['met'] else 'NOT met'})"
            return f"{row['case']}: {key} = {row[key]:.2f}{target}; max |diff| {row['max_abs_diff']:.1e}"
    return str(row)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="3 rounds of one call: a smoke run")
    parser.add_argument("--json", help="where to write the results (default: bench/results/serving-vs-torch-...)")
    args = parser.parse_args(argv)

    import numba
    import torch
    from threadpoolctl import threadpool_limits

    import engine

    rounds, calls = (3, 1) if args.quick else (args.rounds, 3)
    torch.set_num_threads(args.threads)
    engine.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    lens = np.linspace(1, 512, 16).astype(int)
    np.random.default_rng(0).shuffle(lens)
    info = cpu_info()
    results = []
    with threadpool_limits(limits=args.threads):
        for row in (
            ("varlen 16 seqs of 1..512, H=8, E=64, causal", lens, 8, 8, 64, True, 1.5),
            ("varlen 16 seqs of 1..512, H=8, E=64, not causal", lens, 8, 8, 64, False, None),
            ("varlen 16 seqs of 1..512, Hq=32, Hkv=8, E=128, causal (GQA)", lens, 32, 8, 128, True, None),
        ):
            results.append(varlen_case(*row[:6], rounds, calls, row[6]))
            print(_line(results[-1]), flush=True)
        for name, page_size in (("contiguous", None), ("paged (64)", 64)):
            results.append(mixed_case(f"mixed 8 decode + 2 chunks of 256, {name} caches", page_size, rounds, calls))
            print(_line(results[-1]), flush=True)
    meta = {
        "command": "python bench/serving_vs_torch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": info,
        "threads": args.threads,
        "rounds": rounds,
        "load_average_after": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "gemm": engine.get_backend("cpu").capabilities()["gemm"]["in_use"],
        "date": time.strftime("%Y-%m-%d"),
    }
    path = args.json or os.path.join(HERE, "results", result_file_name(f"serving-vs-torch-{args.threads}threads", info))
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"load average before {info['loadavg_1_5_15'][0]:.1f}, after {meta['load_average_after'][0]:.1f}; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
