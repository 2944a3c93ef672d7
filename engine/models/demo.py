"""``attention-engine demo "SENTENCE"``: a pretrained transformer's attention, computed by the engine.

Runs all-MiniLM-L6-v2 (:mod:`engine.models.minilm`, every attention layer the ``multi-head`` variant) on
one sentence and shows (1) for chosen tokens, the tokens they attend to most in each layer,
averaged over heads; (2) layer by layer, the cosine similarity of the hidden states of the two
occurrences of a repeated word (same word, two contexts); (3) PNG heat maps: one layer and head,
and the grid of all heads of that layer. Needs the ``models`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SPECIAL = ("[CLS]", "[SEP]", "[PAD]")
EXAMPLE = "I sat on the river bank, then went to the bank to withdraw money"


def add_arguments(parser) -> None:
    parser.add_argument("sentence", nargs="?", default=EXAMPLE, help=f"the text to encode (default: {EXAMPLE!r})")
    parser.add_argument(
        "--word",
        help="the repeated word whose two occurrences are compared "
        "(default: the longest word that occurs more than once)",
    )
    parser.add_argument(
        "--tokens",
        nargs="+",
        metavar="TOKEN",
        help="tokens whose strongest attention is printed (default: the repeated word)",
    )
    parser.add_argument("--top", type=int, default=3, help="how many attended tokens to print (default 3)")
    parser.add_argument("--layer", type=int, default=0, help="layer of the heat maps, 0-5 (default 0)")
    parser.add_argument(
        "--head",
        default="auto",
        help="head of the single heat map, 0-11, or 'auto' (default): the head in which "
        "the first chosen token puts most weight on another word",
    )
    parser.add_argument(
        "--output",
        default="attention",
        metavar="PREFIX",
        help="write PREFIX-layer{L}-head{H}.png and PREFIX-layer{L}-heads.png (default: attention)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="engine backend for every attention layer (auto or a name from `attention-engine list`)",
    )


def _cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def repeated_word(tokens) -> str | None:
    """The longest whole word (no ``##`` piece, no special token, at least one letter) occurring more
    than once; ties go to the earliest. None if no word repeats."""
    words = [t for t in tokens if t not in SPECIAL and not t.startswith("##") and any(c.isalpha() for c in t)]
    repeated = [w for w in dict.fromkeys(words) if words.count(w) > 1]
    return max(repeated, key=len) if repeated else None


def top_attended(weights, query: int, tokens, k: int):
    """``[(key index, weight)]``: the k largest weights of row ``query`` of (L, S) head-averaged
    weights among non-special keys, and the total weight on special tokens."""
    row = weights[query]
    ordinary = [j for j, t in enumerate(tokens) if t not in SPECIAL]
    best = sorted(ordinary, key=lambda j: -row[j])[:k]
    special = float(sum(row[j] for j, t in enumerate(tokens) if t in SPECIAL))
    return [(j, float(row[j])) for j in best], special


def auto_head(weights, query: int, tokens) -> int:
    """The head (of (H, L, S) weights) in which token ``query`` puts the largest weight on another
    word: not itself, not a special token, not another occurrence of the same word."""
    others = [j for j, t in enumerate(tokens) if t not in SPECIAL and t != tokens[query]]
    return int(np.argmax(weights[:, query, others].max(axis=1)))


def run(args) -> int:
    from .. import list_backends
    from ..plotting import plot_attention
    from .minilm import MiniLM

    if args.top < 1:
        raise SystemExit(f"--top must be at least 1, got {args.top}")
    if args.backend != "auto" and args.backend not in list_backends():
        raise SystemExit(f"--backend must be auto or one of {list_backends()}, got {args.backend!r}")
    model = MiniLM()
    if not 0 <= args.layer < model.num_layers:
        raise SystemExit(f"--layer must be in 0..{model.num_layers - 1}, got {args.layer}")
    out = model.forward(args.sentence, backend=args.backend, need_weights=True)
    tokens = out.tokens[0]
    attentions = [a[0] for a in out.attentions]  # per layer (H, L, L)
    hidden = [h[0] for h in out.hidden_states]
    print(
        f"all-MiniLM-L6-v2, {model.num_layers} layers x {model.num_heads} heads; every attention layer is the "
        f"engine variant {model.variant_name!r}, backend {args.backend!r}"
    )
    print("tokens: " + " ".join(f"{i}:{t}" for i, t in enumerate(tokens)))

    word = args.word.lower() if args.word else repeated_word(tokens)
    chosen = [t.lower() for t in args.tokens] if args.tokens else ([word] if word else [])
    queries = [i for i, t in enumerate(tokens) if t in chosen]
    missing = sorted(set(chosen) - set(tokens))
    if missing:
        raise SystemExit(f"tokens {missing} are not among the sentence's tokens {tokens}")

    if not queries:
        print("\nno word occurs twice: pass --tokens to choose tokens, --word to compare two occurrences")
    for i in queries:
        print(
            f"\n{tokens[i]!r} (token {i}) attends most to, averaged over the {model.num_heads} heads "
            f"(in brackets: weight on [CLS]/[SEP]):"
        )
        for layer, a in enumerate(attentions):
            best, special = top_attended(a.mean(axis=0), i, tokens, args.top)
            cells = "  ".join(f"{tokens[j]}({j}) {w:.2f}" for j, w in best)
            print(f"  layer {layer}: {cells}  [{special:.2f}]")

    if word is not None:
        where = [i for i, t in enumerate(tokens) if t == word]
        if len(where) < 2:
            print(f"\n{word!r} occurs {len(where)} time(s): no similarity to compare")
        else:
            a, b = where[:2]
            words = [i for i, t in enumerate(tokens) if t not in SPECIAL and t != word]
            print(
                f"\ncosine similarity of the hidden states of {word!r} at tokens {a} and {b}, and for "
                f"reference the mean over all pairs of other (different) tokens:"
            )
            for layer, h in enumerate(hidden):
                pairs = [
                    _cosine(h[p], h[q]) for n, p in enumerate(words) for q in words[n + 1 :] if tokens[p] != tokens[q]
                ]
                name = "embeddings" if layer == 0 else f"layer {layer - 1}"
                print(f"  {name:>10}: {word} vs {word} {_cosine(h[a], h[b]):.3f}   other pairs {np.mean(pairs):.3f}")

    import matplotlib.pyplot as plt

    layer_w = attentions[args.layer]
    if args.head == "auto":
        head = auto_head(layer_w, queries[0], tokens) if queries else 0
    else:
        try:
            head = int(args.head)
        except ValueError:
            raise SystemExit(f"--head must be an int or 'auto', got {args.head!r}") from None
        if not 0 <= head < model.num_heads:
            raise SystemExit(f"--head must be in 0..{model.num_heads - 1}, got {head}")
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    single = prefix.with_name(f"{prefix.name}-layer{args.layer}-head{head}.png")
    grid = prefix.with_name(f"{prefix.name}-layer{args.layer}-heads.png")
    fig = plot_attention(layer_w, tokens, head=head, title=f"all-MiniLM-L6-v2, layer {args.layer}, head {head}")
    fig.savefig(single, dpi=120)
    plt.close(fig)
    fig = plot_attention(
        layer_w,
        tokens,
        panel_title="head {}",
        title=f"all-MiniLM-L6-v2, layer {args.layer}: all {model.num_heads} heads (rows: queries, columns: keys)",
    )
    fig.savefig(grid, dpi=100)
    plt.close(fig)
    print(f"\nwrote {single} and {grid}")
    return 0


if __name__ == "__main__":  # python -m engine.models.demo
    p = argparse.ArgumentParser(prog="python -m engine.models.demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
