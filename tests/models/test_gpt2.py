"""The NumPy GPT-2 decoder generates what transformers generates: the same greedy tokens for 128
new tokens and logits within 1e-4 at every step, for one prompt and for a ragged batch of four
(a tiny configuration; random weights from a fixed seed, nothing downloaded)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.models.gpt2 import GPT2, random_gpt2, tiny_config, transformers_generate  # noqa: E402

NEW_TOKENS = 128


@pytest.fixture(scope="module")
def models():
    return random_gpt2(tiny_config(), seed=0)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 256, n)) for n in lengths]


@pytest.mark.parametrize("lengths", [(5,), (3, 9, 1, 14)], ids=["batch-1", "ragged-batch-4"])
def test_generates_like_transformers(models, lengths):
    model, ours = models
    prompts = _prompts(lengths)
    want = transformers_generate(model, prompts, NEW_TOKENS)
    got = ours.generate(prompts, NEW_TOKENS, backend="cpu")
    assert got.tokens.shape == (len(prompts), NEW_TOKENS) and got.logits.shape == want.logits.shape
    np.testing.assert_array_equal(got.tokens, want.tokens)
    err = np.abs(got.logits - want.logits).max(axis=(1, 2))  # per step
    assert err.max() <= 1e-4, f"step {err.argmax()}: logits differ by {err.max():.3g}"
    assert len(np.unique(got.tokens)) > 10  # the greedy choices vary: a real check, not one token repeated


def test_every_backend_and_a_bfloat16_cache(models):
    """The decoder runs on every decoding backend (the oracle too); a bfloat16 cache gives the same
    first tokens with logits within bfloat16 rounding."""
    import engine

    _, ours = models
    prompts = _prompts((4, 7))
    want = ours.generate(prompts, 8, backend="cpu")
    for name in engine.list_backends():
        backend = engine.get_backend(name)
        if backend.supports_decode and backend.unavailable_reason() is None:  # cuda needs a GPU
            got = ours.generate(prompts, 8, backend=name)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    half = ours.generate(prompts, 8, backend="cpu", cache_dtype=ml_dtypes.bfloat16)
    assert np.abs(half.logits - want.logits).max() < 0.1
    np.testing.assert_array_equal(half.tokens[:, :2], want.tokens[:, :2])


@pytest.mark.parametrize(
    "prompts, new, words",
    [
        ([[]], 4, "every prompt needs at least one token"),
        ([[1, 2]], 0, "max_new_tokens must be >= 1"),
        ([[1] * 200], 100, r"exceeds the model's 256 positions"),
    ],
)
def test_bad_arguments(models, prompts, new, words):
    with pytest.raises(ValueError, match=words):
        models[1].generate(prompts, new)


def test_weights_keep_their_values_in_the_order_a_decode_step_reads_fastest(models):
    """A block weight whose output is no wider than its input is held column-major (BLAS's
    dot-product form of a one-row product), the others row-major; the values are transformers'."""
    model, ours = models
    state = model.state_dict()
    orders = set()
    for name, w in ours.p.items():
        np.testing.assert_array_equal(w, state[name].numpy())
        assert w.dtype == np.float32
        if name.startswith("transformer.h.") and name.endswith(".weight") and w.ndim == 2:
            column_major = w.shape[1] <= w.shape[0]
            assert w.flags.f_contiguous if column_major else w.flags.c_contiguous, (name, w.shape)
            orders.add(column_major)
        else:
            assert w.flags.c_contiguous, name
    assert orders == {True, False}  # the tiny model has both kinds (c_proj; c_attn, c_fc)


def test_generate_command_times_both_libraries(tmp_path):
    """``attention-engine generate`` on the tiny model: the same tokens, tokens/s for both, each
    run after its pause and warm-up; a negative pause is refused."""
    import json
    import subprocess
    import sys

    out = tmp_path / "gen.json"
    cmd = [sys.executable, "-m", "engine.cli", "generate", "--model", "tiny", "--new-tokens", "4"]
    cmd += ["--rounds", "1", "--threads", "1", "--pause", "0.01", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["meta"]["pause_s"] == 0.01 and got["meta"]["threads"] == 1
    rows = got["results"]
    assert [r["case"] for r in rows] == ["batch 1", "ragged batch 4"]
    for r in rows:
        assert r["same_tokens"] and r["engine_tokens_per_s"] > 0 and r["transformers_tokens_per_s"] > 0
        assert len(r["times_s"]["engine"]) == len(r["times_s"]["transformers"]) == 1
    for pause in ("-1", "nan", "inf"):
        bad = subprocess.run(cmd[:-2] + ["--pause", pause], capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0, pause
        assert f"--pause must be a finite number of seconds >= 0, got {float(pause)}" in bad.stderr


@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (15, 1), (16, 1), (1, 16), (3, 5), (0, 3), (2, 0)], ids=str)
@pytest.mark.parametrize("order", ["C", "F"])
def test_linear_is_x_at_w_plus_b_in_either_order(shape, order):
    """Every path of ``_linear`` (stacked one-row products, one 2-D product, a column-major weight
    through its transpose) gives ``x @ w + b`` to float32 rounding, with the shape (B, L, out)."""
    from engine.models.gpt2 import _linear

    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape + (48,), dtype=np.float32)
    w = np.array(rng.standard_normal((48, 40), dtype=np.float32), order=order)
    b = rng.standard_normal(40, dtype=np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64) + b
    got = _linear(x, w, b)
    assert got.shape == shape + (40,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_linear(x, w), want - b, rtol=1e-5, atol=1e-5)


def test_from_transformers_copies_every_weight():
    """The NumPy model owns its weights: changing the torch model in place afterwards (an optimiser
    step, ``load_state_dict``) leaves it as it was (most arrays shared the torch tensors' memory)."""
    import torch

    model, ours = random_gpt2(tiny_config(), seed=1)
    before = {k: v.copy() for k, v in ours.p.items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(2.0)
    for k, v in ours.p.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert "lm_head.weight" not in ours.p  # tied to wte: not held twice
    np.testing.assert_array_equal(ours.wte_t, before["transformer.wte.weight"].T)


def test_an_untied_output_projection_is_used():
    """A state dict whose ``lm_head.weight`` differs from ``wte`` (an untied head) gives
    transformers' logits with that head."""
    import torch

    model, _ = random_gpt2(tiny_config(tie_word_embeddings=False), seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(-0.5)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    ours = GPT2.from_transformers(model)
    prompts = _prompts((6, 3))
    want = transformers_generate(model, prompts, 8)
    got = ours.generate(prompts, 8)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
