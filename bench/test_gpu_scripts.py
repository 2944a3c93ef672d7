"""The GPU check's scripts run end to end without a GPU (their plumbing; GPU time is rare and
short, so a broken script must not be found there): ``gpu_vs_torch.py --smoke --device cpu`` runs
every forward/backward/decode case on the cpu backend against torch and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_gpu_vs_torch_dry_run(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "gpu_vs_torch.py"),
            "--smoke",
            "--device",
            "cpu",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    # every kind and dtype appears; each case either ran within tolerance or was refused by name
    assert {(r["kind"], r["dtype"]) for r in rows} == {
        (k, d) for k in ("forward", "backward", "decode") for d in ("float32", "float16", "bfloat16")
    }
    for r in rows:
        assert "error" not in r, r
        assert ("engine_s" in r and r["ok"]) or "cannot run these inputs" in r["refused"], r
    assert all("engine_s" in r for r in rows if r["dtype"] == "float32"), rows
    assert data["meta"]["copy_gbps"] > 0


def test_gpu_vs_torch_rejects_unknown_dtype():
    res = subprocess.run(
        [sys.executable, os.path.join(HERE, "gpu_vs_torch.py"), "--dtypes", "float8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--dtypes takes float32, float16 and bfloat16" in res.stderr
