"""Named backward cases and torch's autograd of the same attention (the gradient oracle).

Each case is small, with lengths that are not tile multiples. ``torch_attention`` is the math
path written out in torch ops (scores, mods, masks, softmax, weighted sum), so that mods and
masks of every kind have a torch equivalent; rows with no visible key give zeros (torch >= 2.5
semantics) with zero gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from variants.alibi import alibi_bias, alibi_slopes
from variants.sliding_window import window_mask as window
from variants.softcap import tanh_softcap

from testmods import cubic_mod

CASES = [
    "plain",
    "bool_mask",
    "float_mask",
    "float_mask_rows",
    "float_mask_cols",
    "causal_l_lt_s",
    "causal_l_gt_s",
    "gqa",
    "e_ne_ev",
    "unbatched",
    "alibi",
    "softcap",
    "cubic_mod",
    "mask_mod",
]
#: cases that compile kernels of their own (mods): kept to float64 in the suite (compile time).
#: The built-in variants' mods (alibi: complex-step derivative; softcap: declared; the sliding
#: window's mask_mod) get disk-cached kernels; ``cubic_mod`` (a test's own) runs on the reference
#: backend only, as a kernel specialised on it would compile in every test run.
MOD_CASES = {"alibi", "softcap", "cubic_mod", "mask_mod"}
REFERENCE_ONLY = {"cubic_mod"}


def make_case(rng, case: str, dtype):
    """``(q, k, v, kwargs)`` for the engine, with ``kwargs["attn_mask"]`` etc."""
    B, Hq, H, L, S, E, Ev = 2, 2, 2, 37, 53, 8, 8
    kw = {}
    if case == "gqa":
        Hq, H = 4, 1
        kw["enable_gqa"] = True
    if case == "e_ne_ev":
        Ev = 12
    if case.startswith("causal"):
        kw["is_causal"] = True
        L, S = (37, 53) if case == "causal_l_lt_s" else (53, 37)
    shape = lambda h, n, e: (n, e) if case == "unbatched" else (B, h, n, e)  # noqa: E731
    q = rng.standard_normal(shape(Hq, L, E)).astype(dtype)
    k = rng.standard_normal(shape(H, S, E)).astype(dtype)
    v = rng.standard_normal(shape(H, S, Ev)).astype(dtype)
    if case == "bool_mask":
        m = rng.random((B, 1, L, S)) > 0.3
        m[0, 0, 3] = False  # a fully masked row
        kw["attn_mask"] = m
    if case == "float_mask":
        m = rng.standard_normal((1, Hq, L, S)).astype(dtype)
        m[0, 1, 5] = -np.inf  # a fully masked row
        m[0, 0, :, 7] = -np.inf
        kw["attn_mask"] = m
    if case == "float_mask_rows":  # a per-key bias shared by rows and heads (a padding-style bias)
        kw["attn_mask"] = rng.standard_normal((B, 1, 1, S)).astype(dtype)
    if case == "float_mask_cols":  # a per-query bias, broadcast over keys and batch
        kw["attn_mask"] = rng.standard_normal((Hq, L, 1)).astype(dtype)
    if case == "unbatched":
        kw["attn_mask"] = rng.standard_normal((S,)).astype(dtype)
    if case == "alibi":
        kw.update(is_causal=True, score_mod=alibi_bias, mod_args=(alibi_slopes(Hq).astype(dtype),))
    if case == "softcap":
        kw.update(score_mod=tanh_softcap, mod_args=(dtype(1.5),), scale=2.0)
    if case == "cubic_mod":
        kw.update(score_mod=cubic_mod, mod_args=(dtype(0.05),))
    if case == "mask_mod":
        kw.update(mask_mod=window, mod_args=(9, 2))
    return q, k, v, kw


def torch_attention(
    q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, score_mod=None, mask_mod=None, mod_args=()
):
    """Attention in torch ops (q, k, v and a float mask are torch tensors): the autograd oracle."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if enable_gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(E) if scale is None else scale)
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    if score_mod is alibi_bias:
        slopes = torch.as_tensor(np.asarray(mod_args[0]), dtype=s.dtype)
        s = s - slopes[:, None, None] * (i - j).abs().to(s.dtype)
    elif score_mod is tanh_softcap:
        cap = float(mod_args[0])
        s = cap * torch.tanh(s / cap)
    elif score_mod is cubic_mod:
        s = s + float(mod_args[0]) * s**3 - 0.01 * (i - j).to(s.dtype)
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allowed = allowed & (j <= i)
    if mask_mod is window:
        left, right = mod_args
        allowed = allowed & (i - left <= j) & (j <= i + right)
    s = s.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v
