"""The training demo, short: a character-level LM trained with torch's attention and with the
engine's, from the same initialisation and batches, agrees step by step (float64), and trains."""

import json

import numpy as np

import engine
from engine.cli import main


def test_short_training_agrees_with_torch_step_by_step_and_trains(tmp_path):
    import torch

    out_json, out_png = tmp_path / "losses.json", tmp_path / "losses.png"
    threads_before = engine.get_num_threads(), torch.get_num_threads()
    rc = main(
        [
            "train",
            "--steps",
            "25",
            "--dtype",
            "float64",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--context",
            "16",
            "--batch",
            "8",
            "--lr",
            "1e-2",
            "--threads",
            "1",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--plot-bias",
            str(tmp_path / "bias.png"),
        ]
    )
    assert rc == 0
    # --threads 1 held for the run only: the process's settings are as they were (it leaked before)
    assert (engine.get_num_threads(), torch.get_num_threads()) == threads_before
    result = json.loads(out_json.read_text())
    assert set(result["runs"]) == {
        "torch SDPA",
        "engine",
        "torch math + ALiBi bias tensor",
        "engine ALiBi score_mod",
        "torch math + T5 bias tensor",
        "engine T5 bias score_mod",
    }
    # the learned T5 tables: trained away from their zero start, and the same both ways
    tables = result["t5_tables"]
    for a, b in zip(tables["engine T5 bias score_mod"], tables["torch math + T5 bias tensor"]):
        assert np.abs(np.asarray(a)).max() > 1e-3
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=0)
    for name, diff in result["relative_difference"].items():
        assert len(diff) == 25
        assert max(diff) <= 1e-8, (name, max(diff))
    for name, losses in result["runs"].items():
        assert np.mean(losses[-5:]) < losses[0] - 0.5, (name, losses[0], losses[-5:])  # it learns
    for png in (out_png, tmp_path / "bias.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
