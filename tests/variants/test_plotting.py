"""engine.plotting.plot_attention on weights returned by the engine's variants."""

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import engine  # noqa: E402
from engine.plotting import plot_attention  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _labels(ticklabels):
    return [t.get_text() for t in ticklabels]


def _mha_weights(rng, shape, **kwargs):
    attn = engine.get_variant("multi-head", embed_dim=16, num_heads=4, seed=0)
    _, w = attn(rng.standard_normal(shape).astype(np.float32), need_weights=True, backend="reference", **kwargs)
    return w


def test_one_heat_map_has_tokens_on_both_axes(rng):
    tokens = ["the", "cat", "sat", "down", "."]
    w = _mha_weights(rng, (5, 16))  # unbatched, averaged over heads: (L, S)
    assert w.shape == (5, 5)
    fig = plot_attention(w, tokens, title="mine")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == tokens and _labels(ax.get_yticklabels()) == tokens
    np.testing.assert_allclose(ax.images[0].get_array(), w, rtol=1e-6)
    assert ax.get_title() == "mine"
    assert len(fig.axes) == 2  # the heat map and its colour bar


def test_cross_attention_uses_key_tokens_on_the_x_axis(rng):
    attn = engine.get_variant("cross", embed_dim=16, num_heads=4, kdim=8, vdim=8, seed=0)
    q = rng.standard_normal((2, 3, 16)).astype(np.float32)
    kv = rng.standard_normal((2, 6, 8)).astype(np.float32)
    _, w = attn(q, kv, kv, need_weights=True, backend="reference")  # (N, L, S) averaged
    assert w.shape == (2, 3, 6)
    queries, keys = ["a", "b", "c"], [f"k{i}" for i in range(6)]
    fig = plot_attention(w, queries, keys, batch=1, colorbar=False)
    (ax,) = fig.axes
    assert _labels(ax.get_xticklabels()) == keys and _labels(ax.get_yticklabels()) == queries
    np.testing.assert_allclose(ax.images[0].get_array(), w[1], rtol=1e-6)


def test_per_head_weights_draw_a_grid_with_a_shared_colour_scale(rng, tmp_path):
    tokens = list("abcdefg")
    w = _mha_weights(rng, (2, 7, 16), average_attn_weights=False)
    assert w.shape == (2, 4, 7, 7)
    fig = plot_attention(w, tokens, batch=1, ncols=3)
    panels = [ax for ax in fig.axes if ax.images]
    heat = [ax for ax in panels if ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in heat] == ["head 0", "head 1", "head 2", "head 3"]
    for i, ax in enumerate(heat):
        np.testing.assert_allclose(ax.images[0].get_array(), w[1, i], rtol=1e-6)
        assert ax.images[0].get_clim() == (0.0, pytest.approx(float(w[1].max())))
        assert _labels(ax.get_xticklabels()) == tokens
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_head_picks_one_panel_and_torch_tensors_are_accepted(rng):
    import torch  # a test dependency (the test extra)

    w = _mha_weights(rng, (1, 4, 16), average_attn_weights=False)  # (1, H, L, S): batch may be omitted
    fig = plot_attention(torch.from_numpy(w), list("wxyz"), head=2)
    ax = fig.axes[0]
    assert ax.get_title() == "head 2"
    np.testing.assert_allclose(ax.images[0].get_array(), w[0, 2], rtol=1e-6)


def test_draws_into_a_given_axes(rng):
    fig, (left, right) = plt.subplots(1, 2)
    w = _mha_weights(rng, (3, 16))
    assert plot_attention(w, ["x", "y", "z"], ax=right, colorbar=False) is fig
    assert right.images and not left.images


def test_bad_arguments_name_the_problem(rng):
    w = _mha_weights(rng, (2, 5, 16), average_attn_weights=False)  # (2, 4, 5, 5)
    tokens = list("abcde")
    with pytest.raises(ValueError, match=r"query_tokens has 4 tokens .*\(2, 4, 5, 5\)"):
        plot_attention(w, tokens[:4], batch=0)
    with pytest.raises(ValueError, match="key_tokens has 6"):
        plot_attention(w, tokens, tokens + ["f"], batch=0)
    with pytest.raises(ValueError, match="pass batch="):
        plot_attention(w, tokens)
    with pytest.raises(ValueError, match="batch must be an int in"):
        plot_attention(w, tokens, batch=2)
    with pytest.raises(ValueError, match="head must be an int in"):
        plot_attention(w, tokens, batch=0, head=4)
    with pytest.raises(ValueError, match="ax= draws one heat map"):
        plot_attention(w, tokens, batch=0, ax=plt.subplots()[1])
    with pytest.raises(ValueError, match="not both"):
        plot_attention(w[0], tokens, batch=0, head=0)
    with pytest.raises(ValueError, match="no batch or head"):
        plot_attention(w[0, 0], tokens, head=0)
    with pytest.raises(ValueError, match="got shape"):
        plot_attention(w[None], tokens)
    with pytest.raises(TypeError, match="one string"):
        plot_attention(w[0, 0], "abcde")
    with pytest.raises(TypeError, match="numeric"):
        plot_attention(np.array([["a"]]), ["a"])
