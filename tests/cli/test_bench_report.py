"""What ``attention-engine`` prints and draws, from rows made here (no measurement) and from short
runs: the summary never compares a backend with itself and says why a comparison is missing; a
busy machine is named; Ctrl-C keeps what was measured; ``bench.png`` reads in seconds on a laptop;
``--help`` says whole sentences."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.cli import main

CASES = [
    "alibi",
    "cross",
    "document",
    "grouped-query",
    "masked",
    "multi-head",
    "self",
    "sliding-window",
    "softcap",
    "sdpa",
    "extra",
]


def _rows(ratios: dict, peak_ratio=1.5):
    """A cpu row and a baseline row per (case, L), the baseline ``ratio`` times slower."""
    rows = []
    for (case, L), ratio in ratios.items():
        base_impl = "torch-sdpa" if case == "sdpa" else "torch-mha"
        rows.append(dict(case=case, L=L, impl="cpu", backend="cpu", baseline=False, time_s=0.01, peak_bytes=2**20))
        rows.append(
            dict(
                case=case,
                L=L,
                impl=base_impl,
                backend=None,
                baseline=True,
                time_s=0.01 * ratio,
                peak_bytes=int(2**20 * peak_ratio),
            )
        )
    return rows


# -- the summary --------------------------------------------------------------------------------
def test_summary_never_compares_the_baseline_backend_with_itself():
    """grouped-query's baseline is the reference backend (torch's layer cannot hold its weights);
    with the cpu row skipped, the summary said 'reference ... 1.00x faster'."""
    rows = [
        dict(case="grouped-query", L=256, impl="reference", backend="reference", baseline=True, time_s=0.5),
        dict(
            case="grouped-query",
            L=256,
            impl="cpu",
            backend="cpu",
            baseline=False,
            time_s=None,
            skipped=True,
            error="skipped: 0.3 s per call at L=128 predicts 1.2 s here (over --max-call-s 1)",
        ),
    ]
    from engine.benchmark.report import format_summary

    text = format_summary(rows)
    assert "1.00x" not in text
    assert "no engine row measured" in text
    assert "grouped-query at L=256: no engine row measured (cpu: skipped: 0.3 s per call" in text


def test_summary_says_why_no_baseline_was_measured():
    rows = _rows({("multi-head", 256): 2.0})
    rows[1].update(time_s=None, error="RuntimeError: torch failed")
    rows.append(dict(case="sdpa", L=256, impl="cpu", backend="cpu", baseline=False, time_s=0.01))
    from engine.benchmark.report import format_summary

    text = format_summary(rows)
    assert "multi-head at L=256: no baseline measured (torch-mha: RuntimeError: torch failed)" in text
    assert "sdpa at L=256: no baseline measured (no baseline implementation in this run)" in text


@pytest.mark.parametrize(
    "before, after, busy",
    [
        ([0.1, 0.2, 0.3], [2.1, 1.0, 0.5], False),  # quiet: the benchmark's own 2 threads after
        ([3.5, 3.0, 2.0], [4.0, 3.5, 2.5], True),  # others' load before
        ([0.2, 0.1, 0.1], [4.5, 2.0, 1.0], True),  # others' load during the run
    ],
)
def test_busy_machine_is_named(before, after, busy):
    from engine.benchmark.cli import busy_machine_warning

    machine = {"load_average": before, "load_average_after": after, "usable_cores": 2}
    warning = busy_machine_warning(machine, threads=2)
    assert bool(warning) == busy
    if busy:
        assert f"load average {before[0]:g} before" in warning and "quiet machine" in warning


# -- the plot ------------------------------------------------------------------------------------
def _default_grid_rows():
    """11 cases x the default 3 lengths, ratios where the old plot failed: exactly 1, between 0.5
    and 1, and wide."""
    values = [1.0, 0.55, 0.8, 0.93, 1.07, 3.1, 0.3, 12.0, 1.0, 0.65, 2.0]
    return _rows(
        {(c, L): values[(i + j) % len(values)] for i, c in enumerate(CASES) for j, L in enumerate((256, 512, 1024))}
    )


def test_plot_fits_a_laptop_screen(tmp_path):
    from engine.benchmark.plot import write_plot

    path = tmp_path / "bench.png"
    write_plot(_default_grid_rows(), str(path), "title")
    import matplotlib.image

    h, w = matplotlib.image.imread(str(path)).shape[:2]
    assert w <= 1440 and h <= 900, (w, h)  # was 3520 x 605


def test_plot_bars_ticks_and_labels():
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Rectangle

    from engine.benchmark.plot import BETTER, WORSE, build_figure

    rows = _default_grid_rows()
    fig = build_figure(rows, "title")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    speed = fig.axes[0]
    bars = [p for p in speed.patches if isinstance(p, Rectangle)]
    expected = {(r["case"], r["L"]): r["time_s"] / 0.01 for r in rows if r["baseline"]}
    assert len(bars) == len(expected)
    left = speed.get_xlim()[0]
    texts = [t.get_text() for t in speed.texts]
    for bar, ratio in zip(sorted(bars, key=lambda b: b.get_y()), expected.values()):
        end = bar.get_x() + bar.get_width()
        assert bar.get_x() == pytest.approx(left) and end == pytest.approx(ratio)  # from the edge to the ratio
        disp = speed.transData.transform([[bar.get_x(), 0], [end, 0]])
        assert disp[1, 0] - disp[0, 0] > 20  # a 1.0x bar too is visible (pixels)
        colour = BETTER if ratio >= 1 else WORSE
        assert np.allclose(bar.get_facecolor()[:3], to_rgb(colour))
    assert all(t.endswith("cpu") for t in texts) and len(texts) == len(expected)  # which backend
    for ax in fig.axes:  # tick labels never overlap
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        boxes.sort(key=lambda b: b.x0)
        assert len(boxes) >= 3
        for a, b in zip(boxes, boxes[1:]):
            assert a.x1 < b.x0, [t.get_text() for t in ax.get_xticklabels()]
    labels = [t.get_text() for t in speed.get_yticklabels()]
    assert labels[0] == "alibi  L=256" and labels[1] == "L=512"  # one row per case and length


# -- the command ---------------------------------------------------------------------------------
def test_help_is_whole_sentences(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert "``" not in description and description.strip().endswith("."), description
    assert description.split()[0] == "Exact"


TINY = ["--batch", "1", "--embed-dim", "16", "--heads", "2", "--repeat", "2", "--threads", "1"]


def test_ctrl_c_prints_the_partial_table_and_writes_the_partial_json(tmp_path):
    json_path = tmp_path / "partial.json"
    # 100 lengths: the run lasts far longer than the read loop below takes to see two steps, so
    # the signal always arrives mid-run (with 10 a fast machine finished before it: exit 0)
    n = 100
    lengths = ",".join(str(16 + 8 * i) for i in range(n))
    cmd = [sys.executable, "-m", "engine.cli", "bench", "--variants", "multi-head,self", "--backends", "cpu"]
    cmd += [*TINY, "--lengths", lengths, "--no-functional", "--json", str(json_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the child takes Ctrl-C as a terminal's command does even where this run ignores SIGINT (a
    # shell without job control starts background jobs that way, and children inherit it)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    deadline = time.monotonic() + 600
    while not re.search(rf"\b([2-9]|\d\d+)/{2 * n}\b", seen):  # two or more steps of the first case
        seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        assert proc.poll() is None and time.monotonic() < deadline, seen[-2000:]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out, err = proc.communicate(timeout=600)
    err = seen + err
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    report = json.loads(json_path.read_text())
    assert report["interrupted"] is True
    measured = [r for r in report["rows"] if r.get("time_s")]
    assert len(measured) >= 2 and len(report["rows"]) < 2 * n * 2
    assert "All rows:" in out and "interrupted (Ctrl-C)" in out
    assert any("interrupted (Ctrl-C)" in n for n in report["notes"])


def test_bench_run_names_a_busy_machine(monkeypatch, tmp_path):
    """The run itself prints the warning and writes it to the JSON (load averages injected)."""
    from engine.benchmark import cli as bench_cli

    loads = iter([[9.0, 9.0, 9.0], [9.5, 9.0, 9.0]])

    def fake_machine():
        from engine.runtime.machine import machine_info

        return {**machine_info(), "load_average": next(loads)}

    monkeypatch.setattr(bench_cli, "machine_info", fake_machine)
    json_path = tmp_path / "b.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            ["bench", "--variants", "none", "--backends", "cpu", *TINY, "--lengths", "16", "--json", str(json_path)]
        )
    assert rc == 0
    assert "warning: the machine was busy: 1-minute load average 9 before the run and 9.5 after" in stdout.getvalue()
    assert json.loads(json_path.read_text())["warnings"][0].startswith("the machine was busy")


def test_a_variant_without_torch_layer_or_reference_has_no_baseline_not_itself():
    """grouped-query with --backends cpu only: no row is marked the baseline (the cpu row was, and
    was compared with itself: "1.00 (base)", and the summary said no engine backend was selected)."""
    import contextlib
    import io

    from engine.cli import main

    out = io.StringIO()
    args = ["bench", "--variants", "grouped-query", "--backends", "cpu", "--lengths", "16", "--no-functional"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(args + ["--repeat", "1"])
    text = out.getvalue()
    assert rc == 0
    assert "(base)" not in text and "no engine backend selected" not in text
    assert "compared with the reference backend" in text
