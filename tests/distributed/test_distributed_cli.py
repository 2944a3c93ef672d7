"""``attention-engine distributed`` with no cluster given: starts a LocalCluster of worker
processes, runs the problem, prints time, tasks, bytes moved, dashboard and the cpu comparison."""

import json
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S

pytest.importorskip("distributed", reason="the dask extra is not installed")

pytestmark = pytest.mark.xdist_group("dask")


def test_cli_starts_a_local_cluster_and_compares_with_cpu(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "distributed",
            "--length",
            "96",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--chunk",
            "32",
            "--causal",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        check=True,
    ).stdout
    for label in (
        "cluster",
        "LocalCluster (worker processes): 2 workers, 2 threads; dashboard http",
        "distributed ",
        "bytes moved",
        "cpu backend",
        "ratio",
        "max |difference|",
    ):
        assert label in out, out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["workers"] == 2 and record["tasks"]["pairs"] == 2 * (1 + 2 + 3)  # causal: 3 chunks
    assert record["max_abs_diff"] <= 1e-5 and record["distributed_s"] > 0 and record["cpu_s"] > 0
    assert record["bytes_moved"]["total"] >= 0


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--workers", "0", "--workers: must be at least 1, got 0"),  # waited forever for a worker
        ("--split-every", "1", "--split-every: must be at least 2, got 1"),  # a traceback from Dask
        ("--chunk", "0", "--chunk: must be at least 1, got 0"),  # silently the default
        ("--length", "0", "--length: must be at least 1, got 0"),  # "throughput = 0.01x"
    ],
)
def test_impossible_sizes_are_argparse_errors(option, value, words, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["distributed", option, value])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err
