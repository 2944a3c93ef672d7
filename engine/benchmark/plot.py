"""The benchmark's picture: does the engine beat torch, per case and length, in time and memory."""

from __future__ import annotations

from .report import best_engine_rows

__all__ = ["write_plot"]


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """Two panels of grouped bars, one group per case and one bar per length: the engine's speed
    (baseline time / engine time, the engine's fastest backend) and its memory advantage (baseline
    peak / engine peak), on a log axis centred on 1, so a bar above the line is a win for the
    engine and its label says by how much."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    best = best_engine_rows(rows)
    cases = list(dict.fromkeys(case for case, _ in best))
    lengths = sorted({L for _, L in best})
    colours = {L: plt.get_cmap("viridis")(i / max(1, len(lengths) - 1) * 0.85) for i, L in enumerate(lengths)}
    width = 0.8 / max(1, len(lengths))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(cases) * 2), 5.5))
    panels = (
        (axes[0], "speed: baseline time / engine time", lambda e, b: b["time_s"] / e["time_s"]),
        (
            axes[1],
            "memory: baseline peak / engine peak",
            lambda e, b: b["peak_bytes"] / e["peak_bytes"] if e.get("peak_bytes") and b.get("peak_bytes") else None,
        ),
    )
    for ax, label, metric in panels:
        values = []
        for j, L in enumerate(lengths):
            xs, ys = [], []
            for i, case in enumerate(cases):
                eng, base = best.get((case, L), (None, None))
                value = metric(eng, base) if eng is not None and base is not None else None
                if value:
                    xs.append(i + (j - (len(lengths) - 1) / 2) * width)
                    ys.append(value)
            values += ys
            bars = ax.bar(xs, [y - 1 for y in ys], width * 0.95, bottom=1, color=colours[L], label=f"L = {L}")
            for bar, y in zip(bars, ys):
                ax.annotate(
                    f"{y:.2g}x",
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom" if y >= 1 else "top",
                    fontsize=7,
                    xytext=(0, 2 if y >= 1 else -2),
                    textcoords="offset points",
                )
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        if values:
            lo, hi = min(values + [1.0]), max(values + [1.0])
            ax.set_ylim(lo / 1.6, hi * 1.6)
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(':')[0]}: above 1, the engine is better", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
