"""``attention-engine train`` (or ``python -m engine.models.train_demo``): a character-level
language model trained twice from the same initialisation and the same batches, once with
torch's attention and once with the engine's, and the two loss curves compared step by step.

Two pairs: plain causal attention (torch's ``F.scaled_dot_product_attention`` against
``engine.torch`` through the ``masked`` variant), and ALiBi (torch's math path with the bias as an
explicit tensor against the ``alibi`` variant, whose bias is a ``score_mod``). Everything but the
attention is the same torch code, so the curves differ only by the attention's rounding.

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

__all__ = ["project_text", "train", "compare", "add_arguments", "run", "main"]

#: (name, attention, alibi) of the four runs; pairs share their alibi flag
RUNS = (
    ("torch SDPA", "torch", False),
    ("engine", "engine", False),
    ("torch math + ALiBi bias tensor", "torch", True),
    ("engine ALiBi score_mod", "engine", True),
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
    alibi: bool,
    steps: int,
    dtype: str = "float32",
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    context: int = 64,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train a :class:`~engine.models.char_lm.CharLM` and return the loss of every step.

    The initial parameters are those of the ``attention="torch"`` model built after
    ``torch.manual_seed(seed)``, loaded into whichever model is trained, so every run with the same
    arguments starts from the same point and sees the same batches. AdamW, cross-entropy.
    """
    import torch

    from .char_lm import CharLM

    torch_dtype = getattr(torch, dtype)
    shape = dict(
        vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_layers=n_layers, context=context, alibi=alibi
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
    return losses


def compare(
    steps: int, dtype: str = "float32", text: str | None = None, threads: int | None = None, progress=None, **model
) -> dict:
    """Run the four trainings of :data:`RUNS`; losses, per-step relative differences within each
    pair, and seconds per run."""
    import torch

    import engine

    if threads:
        torch.set_num_threads(threads)
        engine.set_num_threads(threads)
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
    }
    for name, attention, alibi in RUNS:
        t0 = time.perf_counter()
        result["runs"][name] = train(
            data, len(vocab), attention=attention, alibi=alibi, steps=steps, dtype=dtype, **model
        )
        result["seconds"][name] = time.perf_counter() - t0
        if progress:
            progress(f"{name}: {result['seconds'][name]:.1f} s, final loss {result['runs'][name][-1]:.4f}")
    names = [r[0] for r in RUNS]
    result["relative_difference"] = {}
    for base, ours in ((names[0], names[1]), (names[2], names[3])):
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
    bx.set_ylim(floor / 3, 1e-1)
    bx.set_xlabel("step")
    bx.set_ylabel("|loss - torch loss| / torch loss  (equal: 1e-17)")
    bx.set_title("per-step agreement")
    bx.legend(loc="center right")
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
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.models.train_demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
