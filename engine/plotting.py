"""Heat maps of attention weights: ``engine.plot_attention``.

matplotlib is imported on first use only (it is not a dependency of the engine core). Without a
display (no ``DISPLAY``/``WAYLAND_DISPLAY`` on Linux, and no ``MPLBACKEND`` chosen) the
non-interactive Agg backend is selected, so figures can be saved on servers and in CI.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

__all__ = ["plot_attention"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plot_attention needs matplotlib: pip install matplotlib (or the bench or models extra of attention-engine)"
        ) from None
    headless = sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if headless and "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_weights(weights) -> np.ndarray:
    if hasattr(weights, "detach"):  # a torch tensor
        weights = weights.detach().cpu().numpy()
    try:
        w = np.asarray(weights)
    except Exception as exc:
        raise TypeError(f"weights could not be converted to an array: {exc}") from None
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weights must be numeric, got dtype {w.dtype} with shape {w.shape}")
    if w.ndim not in (2, 3, 4):
        raise ValueError(f"weights must be (L, S), (heads, L, S), (N, L, S) or (N, heads, L, S), got shape {w.shape}")
    return w.astype(np.float64, copy=False)


def _index(value, size: int, name: str, shape) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not -size <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}) for weights of shape {shape}, got {value!r}")
    return int(value) % size


def _tokens(tokens, size: int, name: str, shape) -> list:
    if isinstance(tokens, str):
        raise TypeError(f"{name} must be a sequence of token strings, not one string")
    tokens = [str(t) for t in tokens]
    if len(tokens) != size:
        raise ValueError(
            f"{name} has {len(tokens)} tokens but the weights of shape {shape} have {size} "
            f"{'rows' if name == 'query_tokens' else 'columns'}"
        )
    return tokens


def plot_attention(
    weights,
    query_tokens,
    key_tokens=None,
    *,
    batch=None,
    head=None,
    ax=None,
    title=None,
    cmap="viridis",
    colorbar=True,
    ncols=4,
    vmin=0.0,
    vmax=None,
    annotate=False,
    panel_title=None,
):
    """Draw attention weights as a heat map: queries down the rows, keys along the columns.

    Takes any weights the engine returns with ``need_weights=True`` (NumPy arrays or torch
    tensors); the last two axes are (L queries, S keys):

    - ``(L, S)``: one heat map.
    - ``(heads, L, S)`` (unbatched per-head weights): a grid with one panel per head, or the head
      ``head`` alone. ``(N, L, S)`` (batched, averaged over heads): pass ``batch`` to draw one
      sentence; without ``batch`` or ``head`` the first axis is drawn as a grid of panels.
    - ``(N, heads, L, S)``: ``batch`` picks the sentence (it may be omitted when N is 1); then as
      ``(heads, L, S)``.

    :param weights: the weights, shapes as above.
    :type weights: ndarray | torch.Tensor
    :param query_tokens: L labels for the rows (their number must match the weights).
    :type query_tokens: Sequence[str]
    :param key_tokens: S labels for the columns (default ``query_tokens``, i.e. self-attention).
    :type key_tokens: Sequence[str] | None
    :param batch: the sentence of 4-D (or batched 3-D) weights to draw.
    :type batch: int | None
    :param head: the head to draw alone.
    :type head: int | None
    :param ax: draw a single heat map into this matplotlib Axes (not allowed for a grid).
    :type ax: matplotlib.axes.Axes | None
    :param title: the figure's title.
    :type title: str | None
    :param cmap: a matplotlib colormap name.
    :type cmap: str
    :param colorbar: draw a colour bar.
    :type colorbar: bool
    :param ncols: panels per row of a grid.
    :type ncols: int
    :param vmin: the lower end of the colour range.
    :type vmin: float
    :param vmax: its upper end (default: the largest weight drawn, shared by every panel of a grid).
    :type vmax: float | None
    :param annotate: write each weight in its cell (for short sequences).
    :type annotate: bool
    :param panel_title: format string for the title of grid panel i, e.g. ``"head {}"`` (default
        ``"head {}"`` for 4-D weights, ``"[{}]"`` for 3-D ones, whose first axis may be heads or sentences).
    :type panel_title: str | None
    :returns: the ``matplotlib.figure.Figure``. Close it (``plt.close(fig)``) when done.
    """
    w = _as_weights(weights)
    shape = w.shape
    label = "[{}]"
    if w.ndim == 4:
        if batch is None:
            if shape[0] != 1:
                raise ValueError(f"weights of shape {shape} hold {shape[0]} sequences: pass batch=")
            batch = 0
        w = w[_index(batch, shape[0], "batch", shape)]
        label = "head {}"
    elif w.ndim == 3:
        if batch is not None and head is not None:
            raise ValueError(
                f"weights of shape {shape} have one leading axis: pass batch= (for "
                f"(N, L, S)) or head= (for (heads, L, S)), not both"
            )
        if batch is not None:
            w = w[_index(batch, shape[0], "batch", shape)]
        elif head is not None:
            label = "head {}"
    elif batch is not None or head is not None:
        raise ValueError(f"weights of shape {shape} have no batch or head axis; got batch={batch!r}, head={head!r}")
    if w.ndim == 3 and head is not None:
        index = _index(head, w.shape[0], "head", shape)
        w = w[index]
        title = f"head {index}" if title is None else title
    L, S = w.shape[-2:]
    q_labels = _tokens(query_tokens, L, "query_tokens", shape)
    k_labels = q_labels if key_tokens is None else _tokens(key_tokens, S, "key_tokens", shape)
    top = float(np.nanmax(w)) if vmax is None else float(vmax)

    plt = _pyplot()
    if w.ndim == 2:
        if ax is None:
            side = min(max(3.0, 0.32 * max(L, S) + 2.0), 16.0)
            fig, ax = plt.subplots(figsize=(side + (1.2 if colorbar else 0.0), side), layout="constrained")
        else:
            fig = ax.figure
        image = _heat_map(ax, w, q_labels, k_labels, cmap, vmin, top, annotate)
        if title:
            ax.set_title(title)
        if colorbar:
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
        return fig

    if ax is not None:
        raise ValueError(
            f"ax= draws one heat map; weights of shape {shape} give a grid of "
            f"{w.shape[0]} panels (pass head= or batch= to pick one)"
        )
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    panels = w.shape[0]
    ncols = min(int(ncols), panels)
    nrows = math.ceil(panels / ncols)
    side = min(max(2.5, 0.22 * max(L, S) + 1.5), 9.0)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(side * ncols + (1.0 if colorbar else 0.0), side * nrows),
        squeeze=False,
        layout="constrained",
    )
    for i, panel_ax in enumerate(axes.flat):
        if i >= panels:
            panel_ax.set_axis_off()
            continue
        image = _heat_map(panel_ax, w[i], q_labels, k_labels, cmap, vmin, top, annotate, small=True)
        panel_ax.set_title((label if panel_title is None else str(panel_title)).format(i), fontsize=9)
    if title:
        fig.suptitle(title)
    if colorbar:
        fig.colorbar(image, ax=axes, fraction=0.02, pad=0.01, label="attention weight")
    return fig


def _heat_map(ax, w, q_labels, k_labels, cmap, vmin, vmax, annotate, small=False):
    image = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
    size = 6 if small else 9
    ax.set_xticks(range(len(k_labels)), labels=k_labels, rotation=90, fontsize=size)
    ax.set_yticks(range(len(q_labels)), labels=q_labels, fontsize=size)
    if not small:
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
    if annotate:
        threshold = vmin + 0.6 * (vmax - vmin)
        for (r, c), value in np.ndenumerate(w):
            ax.text(
                c,
                r,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=size - 2,
                color="black" if value > threshold else "white",
            )
    return image
