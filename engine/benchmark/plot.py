"""The benchmark's picture: does the engine beat torch, per case and length, in time and memory.

Made to be read in seconds on a laptop screen: one row per case and length (the case named on its
first row), horizontal bars on a log axis with the 1x line marked, green where the engine is
better and red where it is worse, each bar labelled with its ratio and the engine backend that
achieved it (and the baseline when it is not torch). Bars start at the left edge, so a ratio of
exactly 1 is a visible bar that ends on the line; x ticks are at most one per factor of 2, so
their labels never overlap. 1300 pixels wide, 21 pixels per row plus a 130-pixel header (the
default run's 30 rows: 1300 x 760).
"""

from __future__ import annotations

import math

from .report import best_engine_rows, missing_reason

__all__ = ["write_plot", "build_figure"]

#: figure width (inches) and height per row (inches), at :data:`DPI`
WIDTH_IN, ROW_IN, HEADER_IN, DPI = 13.0, 0.21, 1.3, 100
BETTER, WORSE = "#2e8b57", "#c0392b"


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """Major ticks on a log axis: 1x and powers of 2 both ways (or of 10 on wide ranges), none
    closer than a factor 2, so their labels never overlap."""
    span = math.log2(hi / lo)
    step = 2.0 if span <= 10 else 10.0
    ticks, t = [1.0], step
    while t <= hi:
        ticks.append(t)
        t *= step
    t = 1 / step
    while t >= lo:
        ticks.insert(0, t)
        t /= step
    return ticks


def _label(x: float) -> str:
    return f"{x:g}x" if x >= 1 else f"1/{1 / x:g}x"


def build_figure(rows: list[dict], title: str):
    """The figure (two panels: speed and peak memory of the engine's fastest backend against the
    baseline, per case and length); :func:`write_plot` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.patches import Patch

    best = best_engine_rows(rows)
    keys = sorted(best, key=lambda k: (list(dict.fromkeys(c for c, _ in best)).index(k[0]), k[1]))
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN, HEADER_IN + ROW_IN * n), sharey=True, dpi=DPI)
    metrics = (
        ("speed: baseline time / engine time", lambda e, b: b["time_s"] / e["time_s"]),
        (
            "memory: baseline peak / engine peak",
            lambda e, b: b["peak_bytes"] / e["peak_bytes"] if e.get("peak_bytes") and b.get("peak_bytes") else None,
        ),
    )
    ys = list(range(n))
    for ax, (label, metric) in zip(axes, metrics):
        values = {}
        for y, key in zip(ys, keys):
            eng, base = best[key]
            v = metric(eng, base) if eng is not None and base is not None else None
            if v is not None and v > 0 and math.isfinite(v):
                values[y] = v
        vals = list(values.values()) + [1.0]
        lo, hi = min(vals) / 2.2, max(vals) * 3.5  # room for the labels at the bars' ends
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        for y, key in zip(ys, keys):
            eng, base = best[key]
            if y not in values:
                why = missing_reason(rows, *key) if eng is None or base is None else "not measured"
                why = why if len(why) <= 70 else why[:67] + "..."
                ax.text(lo * 1.05, y, why, va="center", fontsize=7, color="0.4")
                continue
            v = values[y]
            ax.barh(y, v - lo, left=lo, height=0.72, color=BETTER if v >= 1 else WORSE, alpha=0.85)
            vs = "" if str(base["impl"]).startswith("torch") else f" vs {base['impl']}"
            ax.text(
                v * 1.04,
                y,
                f"{v:.2f}x {eng['impl']}{vs}",
                va="center",
                fontsize=7.5,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.4, alpha=0.8),
            )
        ax.axvline(1.0, color="black", lw=1.2)
        ax.xaxis.set_major_locator(ticker.FixedLocator(_nice_ticks(lo, hi)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: _label(x)))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(f"{label} (right of the 1x line: the engine is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    ticks = [f"{case}  L={L}" if i == 0 or keys[i - 1][0] != case else f"L={L}" for i, (case, L) in enumerate(keys)]
    axes[0].set_yticks(ys, ticks, fontsize=8)
    axes[0].set_ylim(n - 0.5, -0.5)  # first case on top
    for i in range(1, n):  # a faint rule between cases
        if keys[i][0] != keys[i - 1][0]:
            for ax in axes:
                ax.axhline(i - 0.5, color="0.8", lw=0.6)
    fig.legend(
        handles=[Patch(color=BETTER, label="engine better"), Patch(color=WORSE, label="engine worse")],
        loc="upper right",
        fontsize=8,
        ncol=2,
        frameon=False,
    )
    fig.suptitle(
        f"{title}\nbaseline: torch on the same threads (nn.MultiheadAttention with the variant's weights; "
        "torch SDPA for sdpa); each bar: the engine's fastest backend",
        fontsize=9,
        x=0.01,
        ha="left",
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """Save :func:`build_figure`'s figure as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = build_figure(rows, title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
