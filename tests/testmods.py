"""The ``score_mod``/``mask_mod`` functions the tests compile into kernels, written as a user would.

They live in one importable module so that Numba's disk cache serves them to every pytest-xdist
worker, every child process and every later run: ``conftest.py`` names this module in
``ATTENTION_ENGINE_CACHED_MODS`` (see ``docs/mods.md``), which is safe here because each mod is
self-contained (it calls no function of this module whose edit the cache tag could not see).
Mods whose point is that they are *not* cacheable (closures, a script's own functions) and mods
that must fail to compile stay in their test modules.
"""

from __future__ import annotations

import math


def causal_mod(b, h, q_idx, kv_idx):
    """``is_causal`` (top-left) as a mask_mod."""
    return kv_idx <= q_idx


def window_mod(b, h, q_idx, kv_idx, left, right):
    """May attend when q_idx - left <= kv_idx <= q_idx + right."""
    return q_idx - left <= kv_idx and kv_idx <= q_idx + right


def head_bias(score, b, h, q_idx, kv_idx, slopes):
    """ALiBi's bias with the slopes as an argument."""
    return score - slopes[h] * abs(q_idx - kv_idx)


def softcap_mod(score, b, h, q_idx, kv_idx, cap):
    return cap * math.tanh(score / cap)


def cubic_mod(score, b, h, q_idx, kv_idx, c):
    """A score_mod with no declared derivative: complex-step finds it."""
    return score + c * score * score * score - 0.01 * (q_idx - kv_idx)


def linear_bias(score, b, h, q_idx, kv_idx):
    return score - 0.1 * (q_idx - kv_idx)


def skip_every_third_key(b, h, q_idx, kv_idx):
    return kv_idx % 3 != 1


def table_mod(b, h, q_idx, kv_idx, table):
    """Whatever an (L, S) boolean table says."""
    return table[q_idx, kv_idx]


# -- two arguments shared by a score_mod and a mask_mod (both get every mod_arg, as in the API) --


def doc_alibi(score, b, h, q_idx, kv_idx, slopes, doc):
    """ALiBi over a (L,) document-id argument it ignores."""
    return score - slopes[h] * abs(q_idx - kv_idx)


def same_doc(b, h, q_idx, kv_idx, slopes, doc):
    return doc[q_idx] == doc[kv_idx]


def doc_only(b, h, q_idx, kv_idx, doc):
    return doc[q_idx] == doc[kv_idx]


def batch_doc_alibi(score, b, h, q_idx, kv_idx, doc_ids, slopes):
    """ALiBi next to a (B, L) document-id argument it ignores."""
    return score - slopes[h] * abs(q_idx - kv_idx)


def batch_same_doc(b, h, q_idx, kv_idx, doc_ids, slopes):
    return doc_ids[b, q_idx] == doc_ids[b, kv_idx]


# -- decoding: positions are absolute (the cache's), so mods see where each row and key are ------


def position_bias(score, b, h, q_idx, kv_idx, stride):
    return score + 0.05 * (kv_idx - q_idx) * (h + 1) - 0.3 * b


def stride_mask(b, h, q_idx, kv_idx, stride):
    return (q_idx - kv_idx) % stride != 1


def table_bias(score, b, h, q_idx, kv_idx, table):
    return score + table[h, kv_idx % 4]


# -- distributed: global indices, batch and head ---------------------------------------------------


def alibi_with_batch(score, b, h, q_idx, kv_idx, slopes):
    return score - slopes[h] * (q_idx - kv_idx) + 0.25 * b


def window_by_batch_and_head(b, h, q_idx, kv_idx, slopes):
    return abs(q_idx - kv_idx) <= 9 + b + h


def scale_and_shift(score, b, h, q_idx, kv_idx, ss):
    """A tensor read twice in one mod: a per-head scale and shift of the score."""
    return score * ss[h, 0] + ss[h, 1]


def batch_key_bias(score, b, h, q_idx, kv_idx, kb):
    """A bias per batch entry and key (a learned padding-style bias)."""
    return score + kb[b, kv_idx]


def raising_mod(score, b, h, q_idx, kv_idx):
    """Raises at one score: the exception must reach the caller."""
    if q_idx == 3 and kv_idx == 2:
        raise ValueError("raised by the mod")
    return score


def raising_in_batch_1(score, b, h, q_idx, kv_idx):
    """Raises in every score of batch 1 (tasks a pool's worker thread runs as well as the caller)."""
    if b == 1:
        raise ValueError("raised by the mod in batch 1")
    return score


def mask_raising_in_batch_1(b, h, q_idx, kv_idx):
    """A mask_mod that raises for every element of batch 1 (where the tile map's worker thread
    classifies as well as the caller's)."""
    if b == 1:
        raise ValueError("raised by the mask_mod in batch 1")
    return kv_idx <= q_idx
