"""What the first calls of a process compile, and how long each takes: the cold-start profile.

Runs a fixed set of first calls (float32 and float64 forward, a forward with a ``score_mod`` and
``mod_args``, one with another ``score_mod`` with ``mod_args`` of the same types, the backward
through ``engine.torch`` without and with a ``score_mod``, a GEMV decode step with a write, a
general decode step with a mod, a packed varlen call) in a fresh, private Numba cache folder, and prints
each call's wall time and, from Numba's ``numba:compile`` events, the functions compiled under it
(nested compiles indented under their caller), the largest first. Numba compiles each distinct
argument type of a function apart, so a function listed twice with different types is a place to
look. Run: ``python bench/compile_profile.py [--min-s 0.2]`` (``--json PATH`` keeps the events).
"""

import argparse
import json
import os
import sys
import tempfile
import time

CALLS = (
    "forward float32",
    "forward float64",
    "forward score_mod",
    "forward 2nd score_mod",
    "backward",
    "backward score_mod",
    "decode GEMV",
    "decode general",
    "varlen",
)


def _listen(records: list) -> None:
    from numba.core import event

    depth = [0]

    class Listener(event.Listener):
        def __init__(self):
            self.started = {}

        def on_start(self, ev):
            self.started[id(ev.data["dispatcher"]), str(ev.data["args"])] = (time.perf_counter(), depth[0])
            depth[0] += 1

        def on_end(self, ev):
            depth[0] -= 1
            key = (id(ev.data["dispatcher"]), str(ev.data["args"]))
            t0, level = self.started.pop(key)
            fn = getattr(ev.data["dispatcher"], "py_func", ev.data["dispatcher"])
            name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
            records.append({"s": time.perf_counter() - t0, "depth": level, "function": name, "types": key[1]})

    event.register("numba:compile", Listener())


def _calls():
    import numpy as np
    import torch

    import engine
    from engine.torch import scaled_dot_product_attention as torch_sdpa

    rng = np.random.default_rng(0)
    q = rng.random((1, 2, 64, 64)).astype(np.float32)
    q64 = q.astype(np.float64)
    slopes = np.ones(2, np.float32)

    def alibi(score, b, h, q_idx, kv_idx, slopes):
        return score + slopes[h] * (kv_idx - q_idx)

    def softcap(score, b, h, q_idx, kv_idx, caps):  # another mod, mod_args of the same types
        return caps[h] * np.tanh(score / caps[h])

    def backward(**mods):
        qt = torch.tensor(q, requires_grad=True)
        torch_sdpa(qt, qt, qt, backend="cpu", **mods).sum().backward()

    kc = np.zeros((1, 2, 128, 64), np.float32)
    qv = rng.random((64, 2, 64)).astype(np.float32)
    cu = np.array([0, 30, 64], np.int32)

    def awk(*args, **kw):
        return engine.attention_with_kvcache(*args, backend="cpu", **kw)

    return {
        "forward float32": lambda: engine.scaled_dot_product_attention(q, q, q, backend="cpu"),
        "forward float64": lambda: engine.scaled_dot_product_attention(q64, q64, q64, backend="cpu"),
        "forward score_mod": lambda: engine.scaled_dot_product_attention(
            q, q, q, score_mod=alibi, mod_args=(slopes,), backend="cpu"
        ),
        "forward 2nd score_mod": lambda: engine.scaled_dot_product_attention(
            q, q, q, score_mod=softcap, mod_args=(slopes,), backend="cpu"
        ),
        "backward": backward,
        "backward score_mod": lambda: backward(score_mod=alibi, mod_args=(slopes,)),
        "decode GEMV": lambda: awk(q[:, :, :1], kc, kc.copy(), q[:, :, :1], q[:, :, :1], cache_seqlens=5),
        "decode general": lambda: awk(
            q[:, :, :3], kc, kc.copy(), q[:, :, :3], q[:, :, :3], cache_seqlens=5, score_mod=alibi, mod_args=(slopes,)
        ),
        "varlen": lambda: engine.varlen_attention(qv, qv, qv, cu, cu, is_causal=True, backend="cpu"),
    }


def _tree(records: list) -> list:
    """The compile events of one call as a forest of ``(record, children)``: an event ends after
    those nested in it, so each one adopts the finished events one level deeper before it."""
    waiting: dict = {}  # depth -> finished nodes whose caller has not ended yet
    for r in records:
        node = (r, waiting.pop(r["depth"] + 1, []))
        waiting.setdefault(r["depth"], []).append(node)
    return waiting.get(0, [])


def _show(nodes: list, min_s: float, levels: int, indent: int = 1) -> None:
    """Each node of at least ``min_s`` s, the largest first, its callees indented under it."""
    for r, children in sorted(nodes, key=lambda n: -n[0]["s"]):
        if r["s"] >= min_s:
            print(f"{'    ' * indent}{r['s']:6.2f} s  {r['function']}  {r['types'][:100]}")
            if levels > 1:
                _show(children, min_s, levels - 1, indent + 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--min-s", type=float, default=0.2, help="list compiles of at least this many seconds")
    ap.add_argument("--depth", type=int, default=2, help="levels of nested compiles to list (default 2)")
    ap.add_argument("--json", metavar="PATH", help="write every compile event here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if not opts.child:  # a fresh process whose Numba cache folder is empty: every kernel cold
        import subprocess

        with tempfile.TemporaryDirectory(prefix="ae-numba-cache-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, ATTENTION_ENGINE_AUTOTUNE="0")
            return subprocess.call([sys.executable, __file__, "--child", *(argv or sys.argv[1:])], env=env)
    records: list = []
    _listen(records)
    calls = _calls()
    total = 0.0
    for name in CALLS:
        first = len(records)
        t = time.perf_counter()
        calls[name]()
        s = time.perf_counter() - t
        total += s
        print(f"{name:20s} first call {s:6.2f} s")
        _show(_tree(records[first:]), opts.min_s, opts.depth)
    print(f"{'all':20s} {total:6.2f} s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(records, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
