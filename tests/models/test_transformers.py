"""``engine.transformers``: transformers models with ``attn_implementation="attention_engine"``
against the same models with ``"eager"`` (transformers' own formula), on tiny random-weight models
built from transformers' configs (nothing downloaded; 2 layers, widths 32): gpt-oss (sinks,
alternating sliding-window and full layers, GQA) and Llama (GQA, RoPE). The same greedy tokens
from ``generate()``, logits within 1e-4 in float32 on a left-padded batch, one training step's
gradients, dropout in training through the engine, the calls the engine receives, the refusals.

Needs transformers (the ``transformers`` extra; the ``models`` extra brings it too): skipped
without it unless ATTENTION_ENGINE_REQUIRE_MODELS=1 (as CI sets), where a missing one fails.
"""

import os

import numpy as np
import pytest

if os.environ.get("ATTENTION_ENGINE_REQUIRE_MODELS") != "1":
    pytest.importorskip("transformers", reason="the transformers extra is not installed")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig  # noqa: E402

import engine.transformers as etr  # noqa: E402

from eager_oracle import eager  # noqa: E402

VOCAB = 64
WINDOW = 4  # gpt-oss's sliding layers see 4 keys: the 9-token prompts and the decoding go past it


def _config(kind: str, **extra):
    if kind == "gpt-oss":
        return GptOssConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"], **extra,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **extra,
    )  # fmt: skip


def _pair(kind: str, **extra):
    """``(eager, engine)``: the same random weights (seed 0) under both implementations; gpt-oss's
    sinks drawn from N(0, 1) (its initialisation leaves them near 0, where they would barely
    matter)."""
    etr.register()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_config(kind, **extra), attn_implementation="eager")
    with torch.no_grad():
        for layer in ref.model.layers:
            if hasattr(layer.self_attn, "sinks"):
                layer.self_attn.sinks.normal_(0.0, 1.0)
    ours = AutoModelForCausalLM.from_config(_config(kind, **extra), attn_implementation=etr.NAME)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


@pytest.fixture(scope="module", params=["gpt-oss", "llama"])
def models(request):
    return _pair(request.param)


def _batch():
    """Three prompts of 9 tokens, the first two left-padded (5 and 1 pad tokens)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :1] = 0
    return ids, mask


def test_logits_match_eager_on_a_left_padded_batch(models):
    ref, ours = models
    ids, mask = _batch()
    with torch.no_grad():
        want, got = (m(input_ids=ids, attention_mask=mask).logits for m in (ref, ours))
    real = mask.bool()  # pad rows attend to nothing: eager averages, the engine gives zeros (as SDPA)
    assert got.dtype == torch.float32
    err = (got - want)[real].abs().max().item()
    assert err <= 1e-4, f"logits differ by {err:.3g}"


def test_generate_gives_the_same_greedy_tokens(models):
    ref, ours = models
    ids, mask = _batch()
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert len(torch.unique(got[:, 9:])) > 3  # the choices vary: a real check


def test_a_training_step_has_eager_gradients(models):
    ref, ours = models
    ids, mask = _batch()
    # no loss on pads, nor on the first real token: its logits come from a pad row, which sees no
    # key (eager averages every value there, the engine gives zeros as SDPA does)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    for m in (ref, ours):
        m.train()
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        m.eval()
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        if a.grad is None:  # an expert no token was routed to
            assert b.grad is None, name
            continue
        scale = max(1.0, float(a.grad.abs().max()))
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5 * scale, rtol=0, msg=name)
    sinks = [p.grad for n, p in ours.named_parameters() if n.endswith("sinks")]
    assert all(g is not None and bool(g.abs().gt(0).all()) for g in sinks)


def test_dropout_in_training_runs_through_the_engine(monkeypatch):
    """The layers pass ``dropout`` only in training: the engine applies it (its own stream, seeded
    from torch's generator), so torch.manual_seed repeats it and evaluation has none."""
    _, ours = _pair("llama", attention_dropout=0.5)
    seen = []
    real = etr.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(etr, "scaled_dot_product_attention", spy)
    ids, mask = _batch()
    ours.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(ours(input_ids=ids, attention_mask=mask).logits)
    ours.eval()
    with torch.no_grad():
        plain = ours(input_ids=ids, attention_mask=mask).logits
    assert seen == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert (runs[0] - plain)[mask.bool()].abs().max() > 1e-2
    runs[0].square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_the_calls_the_engine_receives(monkeypatch):
    """generate(): one call per layer for the prompt (L = 9, the model's boolean mask: padding,
    causal rows, gpt-oss's window on its sliding layer), then one per layer and new token (L = 1,
    the whole cache, or on a sliding layer what transformers' cache keeps of it; the padding
    mask), each with the layer's sinks."""
    _, ours = _pair("gpt-oss")
    calls = []
    real = etr.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        mask, sinks = kwargs["attn_mask"], kwargs["sinks"]
        calls.append((query.shape[-2], key.shape[-2], None if mask is None else mask.dtype, sinks is not None))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(etr, "scaled_dot_product_attention", spy)
    ids, mask = _batch()
    ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    b = torch.bool
    assert calls[:2] == [(9, 9, b, True), (9, 9, b, True)]
    steps = [calls[2:4], calls[4:6]]
    assert len(calls) == 6
    for t, (sliding, full) in enumerate(steps, start=1):
        assert full == (1, 9 + t, b, True)
        # transformers' cache keeps WINDOW - 1 keys of a sliding layer (5.x) or all of them (4.55)
        assert sliding in ((1, WINDOW, b, True), (1, 9 + t, b, True))


def test_a_window_without_a_mask_and_the_refusals():
    """Called without a mask (e.g. by a user's own layer), the module's sliding window still applies
    (with the causal rows); softcap, position_bias and flex's BlockMask are refused by name."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    module = torch.nn.Module()
    module.sliding_window, module.is_causal = 3, True
    out, weights = etr.attention_forward(module, q, k, v, None, scaling=0.3)
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    want, _ = eager(q, k, v, (j <= i) & (j > i - 3), 0.3)
    assert weights is None and out.shape == (2, 7, 4, 8)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-12, rtol=0)
    for name in ("softcap", "position_bias"):
        with pytest.raises(ValueError, match=f"does not support {name}"):
            etr.attention_forward(module, q, k, v, None, **{name: 1.0})
    with pytest.raises(TypeError, match="attention_mask must be a tensor or None, got object"):
        etr.attention_forward(module, q, k, v, object())
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        etr.register("")
