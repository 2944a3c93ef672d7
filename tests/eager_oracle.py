"""The float64 oracle of the serving tests: attention written out as gpt-oss's eager formula in
torch (scores, an additive bias for score_mods, a boolean mask, the sink as an extra softmax column
dropped before the values), with autograd for the gradients, sequence by sequence for packed
batches. Independent of the engine: no engine code computes any of it."""

from __future__ import annotations

import numpy as np
import torch


def bottom_right(L: int, S: int, causal: bool, window=(-1, -1)) -> np.ndarray:
    """(L, S) bool, FlashAttention's alignment: row i is the token at S - L + i."""
    pos = S - L + np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    keep = np.ones((L, S), dtype=bool)
    left, right = (-1 if w is None else w for w in window)
    if causal:
        keep &= j <= pos
    if left >= 0:
        keep &= j >= pos - left
    if right >= 0:
        keep &= j <= pos + right
    return keep


def eager(q, k, v, visible, scale, sinks=None, bias=None):
    """``(out (..., Hq, L, Ev), lse (..., Hq, L))`` of float64 torch tensors (autograd flows):
    ``q`` (..., Hq, L, E), ``k``/``v`` (..., H, S, E/Ev) with H dividing Hq, ``visible`` bool
    broadcastable to the scores, ``bias`` a float64 array added to the scaled scores (a
    score_mod's effect), ``sinks`` (Hq,). A row with nothing visible and no sink gives zeros and
    -inf; with a sink, zeros and lse = sink."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + torch.as_tensor(bias, dtype=torch.float64)
    s = s.masked_fill(~torch.as_tensor(np.array(np.broadcast_to(visible, s.shape))), float("-inf"))
    if sinks is not None:
        col = sinks.reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, col], -1)
    lse = torch.logsumexp(s, -1)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    p = torch.where(finite[..., None], torch.exp(s - safe[..., None]), torch.zeros_like(s))
    if sinks is not None:
        p = p[..., :-1]
    return p @ v, lse


def leaf(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)


def eager_varlen(q, k, v, cu_q, cu_k, causal=False, window=(-1, -1), scale=None, sinks=None, bias_fn=None):
    """The packed batch sequence by sequence: ``(out (total_q, Hq, Ev), lse (total_q, Hq))``.
    ``q``/``k``/``v`` are float64 torch tensors in the packed layout; ``bias_fn(b, L, S)`` gives a
    score_mod's (Hq, L, S) additive effect for sequence b."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        L, S = rows.stop - rows.start, keys.stop - keys.start
        qb, kb, vb = (x.transpose(0, 1) for x in (q[rows], k[keys], v[keys]))
        bias = None if bias_fn is None else bias_fn(b, L, S)
        o, lse = eager(qb, kb, vb, bottom_right(L, S, causal, window), scale, sinks, bias)
        outs.append(o.transpose(0, 1))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)
