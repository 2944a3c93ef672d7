"""The NumPy GPT-2 decoder generates what transformers generates: the same greedy tokens for 128
new tokens and logits within 1e-4 at every step, for one prompt and for a ragged batch of four
(a tiny configuration; random weights from a fixed seed, nothing downloaded)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.models.gpt2 import random_gpt2, tiny_config, transformers_generate  # noqa: E402

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
