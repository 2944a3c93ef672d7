"""``attention-engine train`` (or ``python -m engine.models.train_demo``): a character-level
language model trained twice from the same initialisation and the same batches, once with
torch's attention and once with the engine's, and the two loss curves compared step by step.

Three pairs: plain causal attention (torch's ``F.scaled_dot_product_attention`` against
``engine.torch`` through the ``masked`` variant), ALiBi (torch's math path with the bias as an
explicit tensor against the ``alibi`` variant, whose bias is a ``score_mod``), and T5's learned
relative-position bias (torch's math path with the table gathered into a dense float mask, against
a ``score_mod`` reading the table, whose gradient the engine computes). Everything but the
attention is the same torch code, so the curves differ only by the attention's rounding; the
learned T5 tables of both runs can be plotted side by side (``--plot-bias``).

The text is the project's own documentation: the docstrings of the ``engine`` and ``variants``
packages (they ship with every install), or any file given with ``--text``.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
import time

import numpy as np

__all__ = ["project_text", "train", "compare", "plot", "plot_bias", "add_arguments", "run", "main"]

#: (name, attention, position) of the six runs; pairs share their position scheme
RUNS = (
    ("torch SDPA", "torch", "learned"),
    ("engine", "engine", "learned"),
    ("torch math + ALiBi bias tensor", "torch", "alibi"),
    ("engine ALiBi score_mod", "engine", "alibi"),
    ("torch math + T5 bias tensor", "torch", "t5"),
    ("engine T5 bias score_mod", "engine", "t5"),
)


def project_text() -> str:
    """The docstrings (modules, classes, functions) of the ``engine`` and ``variants`` packages,
    in file order: about 60 KB of English about attention."""
    import engine
    import variants

    parts = []
    for package in (engine, variants):
        root = pathlib.Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in [tree, *ast.walk(tree)]:
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        parts.append(doc)
    return "\n\n".join(parts)


def _batches(data: np.ndarray, steps: int, batch: int, context: int, seed: int):
    """The same ``steps`` batches of ``(inputs, targets)`` windows for every run."""
    import torch

    gen = np.random.default_rng(seed)
    for _ in range(steps):
        starts = gen.integers(0, len(data) - context - 1, size=batch)
        windows = np.stack([data[s : s + context + 1] for s in starts])
        yield torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])


def train(
    data: np.ndarray,
    vocab_size: int,
    *,
    attention: str,
    alibi: bool = False,
    steps: int,
    position: str | None = None,
    dtype: str = "float32",
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    context: int = 64,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    tables: list | None = None,
) -> list[float]:
    """Train a :class:`~engine.models.char_lm.CharLM` and return the loss of every step
    (``position`` as the model's; ``tables``, when given, receives the learned T5 bias table of
    each layer after training, as float64 arrays ``(heads, buckets)``).

    The initial parameters are those of the ``attention="torch"`` model built after
    ``torch.manual_seed(seed)``, loaded into whichever model is trained, so every run with the same
    arguments starts from the same point and sees the same batches. AdamW, cross-entropy.
    """
    import torch

    from .char_lm import CharLM

    torch_dtype = getattr(torch, dtype)
    shape = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        context=context,
        position=position or ("alibi" if alibi else "learned"),
    )
    torch.manual_seed(seed)
    init = CharLM(attention="torch", **shape).to(torch_dtype).state_dict()
    model = CharLM(attention=attention, **shape).to(torch_dtype)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for x, y in _batches(data, steps, batch, context, seed):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    if tables is not None:
        tables.extend(b.attn.relative_bias.detach().double().numpy() for b in model.blocks if shape["position"] == "t5")
    return losses


def compare(
    steps: int, dtype: str = "float32", text: str | None = None, threads: int | None = None, progress=None, **model
) -> dict:
    """Run the trainings of :data:`RUNS`; losses, per-step relative differences within each
    pair, and seconds per run. ``threads``: torch's and the engine's threads during the runs (both
    restored after: a library call leaves the process's settings as it found them)."""
    import torch

    from ..runtime.threads import thread_limit

    if not threads:
        return _compare(steps, dtype, text, progress, **model)
    torch_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with thread_limit(threads):
            return _compare(steps, dtype, text, progress, **model)
    finally:
        torch.set_num_threads(torch_before)


def _compare(steps: int, dtype: str, text: str | None, progress, **model) -> dict:
    import torch

    from .char_lm import encode

    data, vocab = encode(text if text is not None else project_text())
    result = {
        "steps": steps,
        "dtype": dtype,
        "characters": int(len(data)),
        "vocab_size": len(vocab),
        "threads": torch.get_num_threads(),
        "model": model,
        "runs": {},
        "seconds": {},
        "t5_tables": {},
    }
    for name, attention, position in RUNS:
        t0 = time.perf_counter()
        tables: list = []
        result["runs"][name] = train(
            data, len(vocab), attention=attention, position=position, steps=steps, dtype=dtype, tables=tables, **model
        )
        if tables:
            result["t5_tables"][name] = [t.tolist() for t in tables]
        result["seconds"][name] = time.perf_counter() - t0
        if progress:
            progress(f"{name}: {result['seconds'][name]:.1f} s, final loss {result['runs'][name][-1]:.4f}")
    names = [r[0] for r in RUNS]
    result["relative_difference"] = {}
    for base, ours in zip(names[0::2], names[1::2]):
        a, b = np.asarray(result["runs"][base]), np.asarray(result["runs"][ours])
        result["relative_difference"][ours] = (np.abs(b - a) / np.abs(a)).tolist()
    return result


def plot(result: dict, path: str) -> None:
    """Loss curves (left) and per-step relative differences (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "torch SDPA": ("C0", "-"),
        "engine": ("C1", "--"),
        "torch math + ALiBi bias tensor": ("C2", "-"),
        "engine ALiBi score_mod": ("C3", "--"),
        "torch math + T5 bias tensor": ("C4", "-"),
        "engine T5 bias score_mod": ("C5", "--"),
    }
    for name, losses in result["runs"].items():
        color, ls = styles[name]
        ax.plot(np.arange(1, len(losses) + 1), losses, color=color, linestyle=ls, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats/char)")
    ax.set_title(f"char-level LM, {result['dtype']}: the same init and batches")
    ax.legend()
    floor = 1e-17  # log scale: steps where the losses are equal are drawn on the floor
    for name, diff in result["relative_difference"].items():
        d = np.maximum(np.asarray(diff), floor)
        bx.semilogy(np.arange(1, len(d) + 1), d, ".", color=styles[name][0], label=f"{name} vs torch")
    target = 1e-3 if result["dtype"] == "float32" else 1e-8
    bx.axhline(target, color="k", linestyle=":", label=f"target {target:g}")
    bx.set_ylim(floor / 3, 10.0)
    bx.set_xlabel("step")
    bx.set_ylabel("|loss - torch loss| / torch loss  (equal: 1e-17)")
    bx.set_title("per-step agreement")
    bx.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bias(result: dict, path: str) -> None:
    """The learned T5 bias of every layer and head as a function of the distance ``q_idx - kv_idx``
    (what the model learned to favour), the engine's run drawn over torch's, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .char_lm import T5_BUCKETS, T5_MAX_DISTANCE
    from .relative_bias import t5_bucket

    runs = result["t5_tables"]
    torch_tables, engine_tables = runs["torch math + T5 bias tensor"], runs["engine T5 bias score_mod"]
    context = result["model"].get("context", 64)
    distance = np.arange(context)
    bucket = t5_bucket(-distance, False, T5_BUCKETS, T5_MAX_DISTANCE)
    layers = len(engine_tables)
    fig, axes = plt.subplots(1, layers, figsize=(5.5 * layers, 4), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        te, tt = np.asarray(engine_tables[layer]), np.asarray(torch_tables[layer])
        for h in range(te.shape[0]):
            ax.plot(distance, te[h, bucket], color=f"C{h}", label=f"head {h} (engine)")
            ax.plot(distance, tt[h, bucket], color=f"C{h}", linestyle="none", marker=".", markersize=4)
        ax.axhline(0, color="0.7", linewidth=0.8)
        ax.set_xlabel("distance q_idx - kv_idx (characters back)")
        ax.set_ylabel("learned bias added to the score")
        ax.set_title(f"layer {layer}: T5 bias after {result['steps']} steps ({result['dtype']})")
        ax.legend(fontsize=7, title="lines: engine; dots: torch", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=64, help="characters per training window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and engine threads (default 1: the model is small)"
    )
    parser.add_argument("--text", default=None, help="train on this UTF-8 file instead of the project's docstrings")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write the loss curves here (needs matplotlib)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write losses and differences here")
    parser.add_argument(
        "--plot-bias", default=None, metavar="PNG", help="write the learned T5 bias per head and distance here"
    )


def run(args) -> int:
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    text = pathlib.Path(args.text).read_text(encoding="utf-8") if args.text else None
    model = dict(
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        context=args.context,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
    )
    result = compare(args.steps, args.dtype, text, args.threads, progress=lambda s: print(s, flush=True), **model)
    print(
        f"\n{result['characters']} characters, vocabulary {result['vocab_size']}, {args.dtype}, "
        f"{result['threads']} threads"
    )
    names = list(result["runs"])
    print(f"{'step':>6}" + "".join(f"{n:>32}" for n in names))
    shown = sorted({1, *range(0, args.steps + 1, max(1, args.steps // 10))} - {0})
    for s in shown:
        print(f"{s:>6}" + "".join(f"{result['runs'][n][s - 1]:>32.6f}" for n in names))
    for name, diff in result["relative_difference"].items():
        print(f"largest per-step relative difference, {name} vs torch: {max(diff):.3g}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.plot_bias:
        plot_bias(result, args.plot_bias)
        print(f"wrote {args.plot_bias}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.models.train_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
