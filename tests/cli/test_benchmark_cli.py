"""``attention-engine bench`` in tiny configurations: the table, the JSON, the PNG, real memory.

Every run here sees the machine as 1000 times slower than it is (``ATTENTION_BENCH_SLOWDOWN``):
what these tests check must not depend on how fast the machine is or how busy, and this proves it
(the skip predictor, for one, would drop rows a test needs if a test left it on).
"""

import contextlib
import io
import json

import numpy as np
import pytest

import engine
from engine.benchmark import predicted_skip
from engine.cli import main
from variants.multi_head import MultiHeadAttention

TINY = [
    "--lengths",
    "16,32",
    "--batch",
    "1",
    "--embed-dim",
    "16",
    "--heads",
    "2",
    "--repeat",
    "2",
    "--threads",
    "1",
    "--max-call-s",
    "inf",
]


@pytest.fixture(autouse=True, scope="module")
def slow_machine():
    """Every benchmark child of this module measures 1000x the real durations."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTENTION_BENCH_SLOWDOWN", "1000")
    yield
    mp.undo()


class RenamedMultiHead(MultiHeadAttention):
    """A third-party variant: the same function as multi-head under another name."""

    name = "bench-test-renamed"
    description = "multi-head under another name (benchmark test plugin)"


class _Plugin:
    @engine.hookimpl
    def attention_variants(self):
        return [RenamedMultiHead]


PLUGIN = _Plugin()  # module level, so the benchmark's child processes can import it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            [
                "bench",
                "--variants",
                "multi-head,self",
                "--backends",
                "cpu,reference",
                *TINY,
                "--json",
                str(json_path),
                "--plot",
                str(png_path),
            ]
        )

    def no_nan(name):  # the file must be standard JSON (no NaN or Infinity)
        raise ValueError(f"non-standard JSON constant {name}")

    return rc, json.loads(json_path.read_text(), parse_constant=no_nan), png_path, stdout.getvalue()


def test_tiny_run_succeeds_and_prints_the_table(tiny_run):
    rc, report, _, printed = tiny_run
    assert rc == 0
    summary, table = printed.split("\nAll rows:\n")
    assert summary.startswith("Summary:")
    lines = table.strip().splitlines()
    header = lines[0].split()
    assert header == ["case", "impl", "L", "time", "GFLOP/s", "peak", "mem", "1st", "call", "t/base", "max|diff|"]
    table_rows = [line.split() for line in lines[2:] if line.startswith(("multi-head", "self", "sdpa"))]
    assert len(table_rows) == len(report["rows"]) == 20
    assert report["config"]["lengths"] == [16, 32] and report["config"]["backends"] == ["cpu", "reference"]


def test_json_has_machine_info(tiny_run):
    machine = tiny_run[1]["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["date"][:2] == "20"
    assert machine["versions"]["numpy"] == np.__version__
    import numba

    assert machine["versions"]["numba"] == numba.__version__


def test_json_has_one_complete_row_per_case_impl_and_length(tiny_run):
    rows = tiny_run[1]["rows"]
    torch = pytest.importorskip("torch")
    assert torch  # the baselines below are torch's
    expected = {
        (case, impl, L)
        for L in (16, 32)
        for case, impls in (
            ("multi-head", ("cpu", "reference", "torch-mha")),
            ("self", ("cpu", "reference", "torch-mha")),
            ("sdpa", ("cpu", "reference", "numpy", "torch-sdpa")),
        )
        for impl in impls
    }
    assert {(r["case"], r["impl"], r["L"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert r["error"] is None, r
        assert r["time_s"] > 0 and len(r["times_s"]) == 2 and r["time_s"] == pytest.approx(np.median(r["times_s"]))
        assert r["gflops"] == pytest.approx(r["flop"] / r["time_s"] / 1e9)
        assert r["first_call_s"] > 0 and isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0
        assert r["baseline_impl"] == ("torch-sdpa" if r["case"] == "sdpa" else "torch-mha")
        if r["baseline"]:
            assert r["ratio"] == 1.0
        else:
            base = next(b for b in rows if b["case"] == r["case"] and b["L"] == r["L"] and b["baseline"])
            assert r["ratio"] == pytest.approx(r["time_s"] / base["time_s"])
            assert r["max_abs_diff"] < 1e-4  # same weights, same function as the torch layer


def test_summary_says_faster_or_slower_per_case_and_length(tiny_run):
    """The summary comes first: per case and L the engine's fastest backend against the baseline,
    'N.NNx faster' or 'N.NNx slower' as the JSON's times say, with both peak memories."""
    _, report, _, printed = tiny_run
    summary = printed.split("\nAll rows:\n")[0].strip().splitlines()[4:]
    rows = report["rows"]
    assert len(summary) == 3 * 2  # multi-head, self, sdpa at L = 16, 32
    for line in summary:
        case, L = line.split()[:2]
        group = [r for r in rows if r["case"] == case and r["L"] == int(L) and r["time_s"]]
        best = min((r for r in group if r["backend"]), key=lambda r: r["time_s"])
        base = next(r for r in group if r["baseline"])
        ratio = base["time_s"] / best["time_s"]
        expected = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        assert f" {best['impl']} " in line and expected in line and " / " in line, (line, expected)


def test_png_is_a_two_panel_plot(tiny_run):
    png = tiny_run[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert w > 1.5 * h > 300  # two panels side by side


def test_peak_memory_is_measured_linear_for_tiled_quadratic_for_materialised(tmp_path):
    json_path = tmp_path / "mem.json"
    rc = main(
        [
            "bench",
            "--variants",
            "none",
            "--backends",
            "cpu,reference",
            "--lengths",
            "256,1024",
            "--batch",
            "1",
            "--embed-dim",
            "32",
            "--heads",
            "2",
            "--repeat",
            "1",
            "--no-torch",
            "--threads",
            "1",
            "--max-call-s",
            "inf",
            "--json",
            str(json_path),
        ]
    )
    assert rc == 0
    peak = {(r["impl"], r["L"]): r["peak_bytes"] for r in json.loads(json_path.read_text())["rows"]}
    scores = 1 * 2 * 1024 * 1024 * 4  # (N, heads, L, L) float32 at L = 1024: 8 MiB
    # the probe counts pages that become resident during the call: a few of the matrix's pages may
    # have stayed resident from earlier work in this process (once 28 KiB of 8 MiB under pytest)
    reused = 256 * 1024
    assert peak["numpy", 1024] >= scores - reused, peak  # the float32 score matrix exists
    assert peak["reference", 1024] >= 2 * scores - reused, peak  # float64 scores
    assert peak["numpy", 1024] > 8 * peak["numpy", 256], peak  # quadratic: 16x from 4x the length
    assert peak["cpu", 1024] < scores / 4, peak  # tiled: never holds the scores
    assert peak["cpu", 1024] < 8 * max(peak["cpu", 256], 65536), peak  # linear, up to allocator granularity


def test_plugin_registered_at_run_time_is_benchmarked_against_torch(tmp_path):
    engine.register_plugin(PLUGIN, name="bench-test-plugin")
    try:
        json_path = tmp_path / "plugin.json"
        rc = main(
            [
                "bench",
                "--variants",
                "bench-test-renamed",
                "--backends",
                "reference",
                "--no-functional",
                *TINY,
                "--json",
                str(json_path),
            ]
        )
    finally:
        engine.unregister_plugin("bench-test-plugin")
    assert rc == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert {r["case"] for r in rows} == {"bench-test-renamed"}
    impls = {r["impl"] for r in rows}
    assert "reference" in impls
    if "torch-mha" in impls:
        assert all(r["max_abs_diff"] < 1e-4 for r in rows if not r["baseline"])


def test_max_call_s_skips_the_lengths_predicted_too_slow(tmp_path, capsys):
    json_path = tmp_path / "skip.json"
    rc = main(
        [
            "bench",
            "--variants",
            "none",
            "--backends",
            "reference",
            "--lengths",
            "16,32",
            "--batch",
            "1",
            "--embed-dim",
            "16",
            "--heads",
            "2",
            "--repeat",
            "1",
            "--no-torch",
            "--max-call-s",
            "1e-9",
            "--threads",
            "1",
            "--json",
            str(json_path),
        ]
    )
    assert rc == 0  # skipping is not a failure
    rows = {(r["impl"], r["L"]): r for r in json.loads(json_path.read_text())["rows"]}
    assert rows["reference", 16]["time_s"] > 0 and rows["numpy", 16]["time_s"] > 0
    for impl in ("reference", "numpy"):
        assert rows[impl, 32]["skipped"] and rows[impl, 32]["time_s"] is None
        assert "over --max-call-s 1e-09" in rows[impl, 32]["error"]
    assert "predicts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "time_s, L, next_L, max_call_s, skipped",
    [
        (0.072, 256, 1024, 1.0, True),  # the field failure: 72 ms at 256 predicts 1.15 s at 1024
        (0.05, 256, 1024, 1.0, False),  # 0.8 s predicted: run
        (0.25, 512, 1024, 1.0, False),  # exactly 1 s predicted: run
        (100.0, 256, 1024, float("inf"), False),  # inf never skips
        (100.0, 256, 1024, 0.0, False),  # 0 never skips
    ],
)
def test_skip_predictor_on_injected_figures(time_s, L, next_L, max_call_s, skipped):
    why = predicted_skip(time_s, L, next_L, max_call_s)
    assert (why is not None) == skipped
    if skipped:
        assert why.startswith(f"skipped: {time_s:.2g} s per call at L={L} predicts") and "--max-call-s" in why


def test_slowdown_must_be_a_positive_number(monkeypatch, capsys):
    from engine.benchmark.measure import _clock_scale

    for bad in ("0", "-1", "fast", "nan", "inf"):
        monkeypatch.setenv("ATTENTION_BENCH_SLOWDOWN", bad)
        with pytest.raises(ValueError, match="ATTENTION_BENCH_SLOWDOWN must be a positive number"):
            _clock_scale()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "no-such-variant"], "unknown variant(s) no-such-variant; available:"),
        (["--backends", "no-such-backend"], "unknown backend 'no-such-backend'"),
        (["--embed-dim", "10", "--heads", "3"], "--embed-dim (10) must be divisible by --heads (3)"),
        (["--variants", "none", "--no-functional"], "nothing to run"),
    ],
)
def test_bad_options_exit_2_naming_the_problem(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_lengths_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--lengths", "128,abc"])
    assert exc.value.code == 2
    assert "lengths must be comma-separated integers" in capsys.readouterr().err
