"""The packed-batch forward's two tiling choices, each on and off, alternating in one process.

    python bench/varlen_tiles_ab.py [--threads N] [--rounds R] [--json PATH]

The case of ``serving_vs_torch.py``'s first row (16 causal sequences of 1 to 512 tokens, H = 8,
E = 64, float32, ``engine.varlen_attention`` on ``cpu``) under four settings of
``engine.backends.cpu.tiles``: the diagonal's strips (``CPU_DIAGONAL_STRIP`` 32, or 1024: one
product per tile, the kernel before them) and the rows per task (``CPU_VARLEN_TASK_ROWS`` 512, or
256: the dense forward's). Each round runs one untimed call and a block of 3 calls of each setting,
the order flipping every round; the median over rounds of the block means, and each setting's time
over the "neither" setting's. The outputs of all four are checked equal to 1e-5 first. Results go to
``bench/results/varlen-tiles-ab-<threads>threads-<cpu>-<date>.json`` with the load average before
and after: on a shared machine compare the ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_vs_torch import alternate  # noqa: E402

from engine.runtime.machine import cpu_info, result_file_name  # noqa: E402

SETTINGS = {"neither": (1024, 256), "strips": (32, 256), "512-row tasks": (1024, 512), "both": (32, 512)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="where to write the results")
    args = parser.parse_args(argv)

    import numba
    from threadpoolctl import threadpool_limits

    import engine
    import engine.backends.cpu.tiles as tiles

    engine.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    lens = np.linspace(1, 512, 16).astype(int)
    np.random.default_rng(0).shuffle(lens)
    rng = np.random.default_rng(0)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q, k, v = (rng.standard_normal((cu[-1], 8, 64), dtype=np.float32) for _ in range(3))
    info = cpu_info()

    def run(setting):
        strip, rows = SETTINGS[setting]

        def call():
            tiles.CPU_DIAGONAL_STRIP, tiles.CPU_VARLEN_TASK_ROWS = strip, rows
            return engine.varlen_attention(q, k, v, cu, cu, is_causal=True, backend="cpu")

        return call

    with threadpool_limits(limits=args.threads):
        fns = {name: run(name) for name in SETTINGS}
        outs = {name: f() for name, f in fns.items()}
        err = max(float(np.abs(o - outs["neither"]).max()) for o in outs.values())
        assert err <= 1e-5, err
        t = alternate(fns, args.rounds, 3)
    rows = {name: {"s": t[name], "over_neither": t[name] / t["neither"]} for name in SETTINGS}
    for name, row in rows.items():
        print(f"{name:14s} {row['s'] * 1e3:8.3f} ms  {row['over_neither']:.3f} of neither's")
    meta = {
        "command": "python bench/varlen_tiles_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": info,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_after": list(os.getloadavg()),
        "max_abs_diff": err,
    }
    path = args.json or os.path.join(HERE, "results", result_file_name(f"varlen-tiles-ab-{args.threads}threads", info))
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"load average before {info['loadavg_1_5_15'][0]:.1f}, after {meta['load_average_after'][0]:.1f}; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
