"""The console script: ``attention-engine list``."""

import json
import subprocess
import sys

from engine.cli import main

from conftest import HANG_TIMEOUT_S


def test_list_prints_variants_with_origin_and_backends(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "multi-head" in out and "variants.multi_head" in out and "attention-engine" in out
    for backend in ("cpu", "reference", "cuda"):
        assert f"  {backend} " in out


def test_list_json_via_console_entry():
    res = subprocess.run(
        [sys.executable, "-m", "engine.cli", "list", "--json"], capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert {v["name"] for v in info["variants"]} >= {"self", "multi-head", "cross", "masked"}
    cpu = next(b for b in info["backends"] if b["name"] == "cpu")
    assert cpu["available"] and cpu["dtypes"] == ["float32", "float64", "float16", "bfloat16"]
    backward = {b["name"]: b["backward"] for b in info["backends"]}
    assert backward == {"cpu": True, "reference": True, "cuda": True}


def test_list_table_shows_which_backends_train(capsys):
    assert main(["list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    header = next(line for line in rows.values() if "backward" in line)
    col = header.index("backward")
    assert rows["cpu"][col : col + 3] == "yes" and rows["reference"][col : col + 3] == "yes"
    assert rows["cuda"][col : col + 3] == "yes"


def test_bad_subcommand_exits_with_usage(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
