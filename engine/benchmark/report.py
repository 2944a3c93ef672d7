"""The benchmark's results as text: the summary against torch, the full table, strict JSON."""

from __future__ import annotations

import math

__all__ = ["format_table", "format_summary", "best_engine_rows", "missing_reason"]


def _fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt_bytes(b):
    if b is None:
        return "-"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def format_table(rows: list[dict]) -> str:
    """The results as an aligned text table, one row per (case, L, implementation).

    A row that could not be measured shows its error (or the backend's refusal) in place of the
    figures.
    """
    header = ("case", "impl", "L", "time", "GFLOP/s", "peak mem", "1st call", "t/base", "max|diff|")
    lines = []
    for r in rows:
        if r.get("time_s") is None:
            error = str(r.get("error"))
            what = "" if r.get("skipped") else "unsupported: " if r.get("unsupported") else "error: "
            lines.append((r["case"], r["impl"], str(r["L"]), what + error))
            continue
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        if r.get("baseline"):
            ratio += " (base)"
        diff = "-" if r.get("max_abs_diff") is None or r.get("baseline") else f"{r['max_abs_diff']:.0e}"
        lines.append(
            (
                r["case"],
                r["impl"],
                str(r["L"]),
                _fmt_time(r["time_s"]),
                "-" if r["gflops"] is None else f"{r['gflops']:.1f}",
                _fmt_bytes(r["peak_bytes"]),
                _fmt_time(r["first_call_s"]),
                ratio,
                diff,
            )
        )
    full = [x for x in (header, *lines) if len(x) == len(header)]
    widths = [
        max(len(x[i]) for x in full + [x[:3] for x in lines if len(x) < len(header)] if i < len(x))
        for i in range(len(header))
    ]
    right = {2, 3, 4, 5, 6}
    out = []
    for n, line in enumerate((header, *lines)):
        cells = [
            c.rjust(w) if i in right and len(line) == len(header) else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths))
        ]
        if len(line) < len(header):  # an error: its message runs on past the columns
            cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line[:3], widths))]
            cells.append(line[3])
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def best_engine_rows(rows: list[dict]) -> dict:
    """Per (case, L): ``(engine row, baseline row)``, the engine row being the fastest measured
    row of an engine backend (``backend`` set) other than the baseline itself, the baseline the row
    marked ``baseline``; either is None when missing. (Where the baseline is an engine backend, as
    ``reference`` for ``grouped-query``, whose weights torch's layer cannot hold, that backend is
    never compared with itself.)"""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["case"], r["L"]), []).append(r)
    best = {}
    for key, group in groups.items():
        engine_rows = [r for r in group if r.get("backend") and r.get("time_s") and not r.get("baseline")]
        base = next((r for r in group if r.get("baseline") and r.get("time_s")), None)
        best[key] = (min(engine_rows, key=lambda r: r["time_s"]) if engine_rows else None, base)
    return best


def missing_reason(rows: list[dict], case: str, L: int) -> str:
    """Why a (case, L) has no comparison: what the rows that could not be measured say (skipped,
    unsupported, an error), or that there is no such row at all."""
    group = [r for r in rows if r["case"] == case and r["L"] == L]
    engine_rows = [r for r in group if r.get("backend") and not r.get("baseline")]
    base = next((r for r in group if r.get("baseline")), None)
    parts = []
    if not any(r.get("time_s") for r in engine_rows):
        why = "; ".join(f"{r['impl']}: {_short(r.get('error'))}" for r in engine_rows if r.get("error"))
        star = next((r for r in group if r["impl"] == "*"), None)  # the case never ran at this L
        if star is not None:
            why = _short(star.get("error"))
        parts.append("no engine row measured" + (f" ({why})" if why else " (no engine backend selected)"))
    if base is None or not base.get("time_s"):
        if base is not None and base.get("error"):
            why = f"{base['impl']}: {_short(base['error'])}"
        elif base is None and not any(r["impl"] == "*" for r in group):
            why = "no baseline implementation in this run" + (
                "" if case == "sdpa" else "; a variant torch has no layer for is compared with the reference backend"
            )
        else:
            why = ""
        parts.append("no baseline measured" + (f" ({why})" if why else ""))
    return "; ".join(parts)


def _short(text, limit: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_summary(rows: list[dict]) -> str:
    """One line per (case, L): the engine's fastest backend against the baseline (torch on the same
    threads), as "N.NNx faster" or "N.NNx slower", and both peak memories; where either side is
    missing, why."""
    header = ("case", "L", "engine", "baseline", "engine speed", "peak memory engine / baseline")
    lines, missing = [], []
    for (case, L), (eng, base) in best_engine_rows(rows).items():
        if eng is None or base is None:
            missing.append((case, str(L), missing_reason(rows, case, L)))
            label = "no engine row measured" if eng is None else "no baseline measured"
            lines.append((case, str(L), label + " (below)", "", "", ""))
            continue
        ratio = base["time_s"] / eng["time_s"]
        speed = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        lines.append(
            (
                case,
                str(L),
                f"{eng['impl']} {_fmt_time(eng['time_s'])}",
                f"{base['impl']} {_fmt_time(base['time_s'])}",
                speed,
                f"{_fmt_bytes(eng.get('peak_bytes'))} / {_fmt_bytes(base.get('peak_bytes'))}",
            )
        )
    widths = [max(len(x[i]) for x in (header, *lines)) for i in range(len(header))]
    out = [
        "  ".join(c.rjust(w) if i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in (header, *lines)
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    for case, L, why in missing:
        out.append(f"{case} at L={L}: {why}")
    return "\n".join(out)


def _add_ratios(rows: list[dict]) -> None:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["case"], r["L"]), []).append(r)
    for group in groups.values():
        base = next((r for r in group if r.get("baseline") and r.get("time_s")), None)
        for r in group:
            r["baseline_impl"] = base["impl"] if base else None
            r["ratio"] = r["time_s"] / base["time_s"] if base and r.get("time_s") else None


def _strict_json(value):
    """``value`` with non-finite floats (a NaN difference, say) written as strings, so the file is
    standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value
