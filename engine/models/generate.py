"""``attention-engine generate``: greedy generation with the NumPy GPT-2 against transformers.

Builds a GPT-2 (GPT-2 small's configuration by default, random weights from a fixed seed: no
download) in transformers, copies it into :class:`engine.models.gpt2.GPT2`, and generates
``--new-tokens`` tokens greedily for one prompt and for a ragged batch of four, with both. Prints
tokens per second for each (medians over ``--rounds``, the libraries alternating), their ratio,
and whether the tokens are the same and how far the logits are apart. Both run on ``--threads``
threads (torch's, NumPy's BLAS through threadpoolctl, and the engine's).

Each timed run starts after ``--pause`` seconds idle and an untimed two-token warm-up of the same
library: each library is timed in its own block, as a user running only one of them sees it.
Right after a torch call, torch's OpenMP workers keep spinning on the cores for a while and slow
whatever runs next (NumPy's BLAS threads included); ``--pause 0`` times the two back to back.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time

import numpy as np

from ..runtime.machine import cpu_model

#: (name, prompt lengths): one prompt, and a ragged batch of four
CASES = [("batch 1", (16,)), ("ragged batch 4", (8, 16, 24, 32))]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        choices=("small", "tiny"),
        default="small",
        help="GPT-2 small's configuration (124M parameters, default) or a tiny one for a quick check",
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per library and case (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="threads for torch, NumPy's BLAS and the engine (default: all cores)",
    )
    parser.add_argument("--backend", default="cpu", help="engine backend for attention (default cpu)")
    parser.add_argument(
        "--cache-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the engine's KV cache dtype (default float32, the same numbers as transformers)",
    )
    parser.add_argument(
        "--pause",
        type=float,
        default=0.3,
        help="seconds idle before each timed run, then a two-token warm-up of the same library (default 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def _cache_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def run(args) -> int:
    if args.new_tokens < 1 or args.rounds < 1 or args.threads < 1:
        raise SystemExit("--new-tokens, --rounds and --threads must be at least 1")
    if not 0 <= args.pause < math.inf:
        raise SystemExit(f"--pause must be a finite number of seconds >= 0, got {args.pause}")
    try:
        import torch
        from threadpoolctl import threadpool_limits
    except ImportError as exc:
        raise SystemExit(
            f"generate needs torch, transformers and threadpoolctl ({exc}); install the models "
            "extra: pip install 'attention-engine[models]' torch"
        ) from None
    import engine

    from .gpt2 import random_gpt2, tiny_config, transformers_generate

    torch.set_num_threads(args.threads)
    import numba

    engine.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    config = tiny_config() if args.model == "tiny" else None
    model, ours = random_gpt2(config, seed=args.seed)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    cache_dtype = _cache_dtype(args.cache_dtype)
    results = []
    with threadpool_limits(limits=args.threads):
        for name, lengths in CASES:
            prompts = [rng.integers(1, vocab, n).tolist() for n in lengths]
            tokens = len(prompts) * args.new_tokens
            ours.generate(prompts, 2, backend=args.backend, cache_dtype=cache_dtype)  # compile, warm up
            times = {"engine": [], "transformers": []}
            runs = {  # each called with the number of new tokens
                "engine": functools.partial(ours.generate, prompts, backend=args.backend, cache_dtype=cache_dtype),
                "transformers": functools.partial(transformers_generate, model, prompts),
            }
            got = {}
            for r in range(args.rounds):
                order = ("engine", "transformers") if r % 2 == 0 else ("transformers", "engine")
                for lib in order:
                    if args.pause > 0:  # the other library's workers go to sleep; this one's wake
                        time.sleep(args.pause)
                        runs[lib](2)
                    t = time.perf_counter()
                    got[lib] = runs[lib](args.new_tokens)
                    times[lib].append(time.perf_counter() - t)
            mine, theirs = got["engine"], got["transformers"]
            te, tt = statistics.median(times["engine"]), statistics.median(times["transformers"])
            row = {
                "case": name,
                "prompt_lengths": list(lengths),
                "new_tokens": args.new_tokens,
                "engine_tokens_per_s": tokens / te,
                "transformers_tokens_per_s": tokens / tt,
                "ratio_engine_over_transformers": tt / te,
                "same_tokens": bool((mine.tokens == theirs.tokens).all()),
                "max_logit_diff": float(np.abs(mine.logits - theirs.logits).max()),
                "times_s": times,
            }
            results.append(row)
            print(
                f"{name:15s} engine {row['engine_tokens_per_s']:8.1f} tokens/s   transformers "
                f"{row['transformers_tokens_per_s']:8.1f} tokens/s   engine/transformers "
                f"{row['ratio_engine_over_transformers']:.2f}x   same tokens: {row['same_tokens']}   "
                f"max logit diff {row['max_logit_diff']:.2g}"
            )
    if args.json:
        meta = {
            "command": "attention-engine generate "
            + " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items()
                if k not in ("json", "command") and not k.startswith("_")
            ),
            "model": args.model,
            "threads": args.threads,
            "pause_s": args.pause,
            "backend": args.backend,
            "cache_dtype": args.cache_dtype,
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0 if all(r["same_tokens"] for r in results) or args.cache_dtype != "float32" else 1
