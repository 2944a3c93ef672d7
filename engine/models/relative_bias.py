"""Learned relative-position biases as ``score_mod``s: a table per head and distance, or T5's table
per head and distance bucket (Raffel et al., 2020, section 2.1), trained through the engine's
``mod_args`` gradients (``docs/training.md``).

The bias of query ``i`` and key ``j`` depends on ``i - j`` only, so it is a table read, never an
L x S array: ``relative_bias`` reads ``table[h, i - j + offset]`` (``table`` of shape
``(heads, L + S - 1)``, ``offset = S - 1``), ``bucketed_relative_bias`` reads
``table[h, buckets[i - j + offset]]`` with ``buckets`` from :func:`relative_position_buckets`
(an integer map: it takes no gradient and sits beside the table in ``mod_args``).
"""

from __future__ import annotations

import math

import numpy as np

from ..problems.mods import cast_like

__all__ = ["relative_bias", "bucketed_relative_bias", "t5_bucket", "relative_position_buckets", "dense_bias"]


def relative_bias(score, b, h, q_idx, kv_idx, table, offset):
    """score + table[h, q_idx - kv_idx + offset]: a learned bias per head and distance."""
    return score + cast_like(table[h, q_idx - kv_idx + offset], score)


def bucketed_relative_bias(score, b, h, q_idx, kv_idx, table, buckets, offset):
    """score + table[h, buckets[q_idx - kv_idx + offset]]: T5's learned bias per head and bucket."""
    return score + cast_like(table[h, buckets[q_idx - kv_idx + offset]], score)


def t5_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket of each ``relative_position = kv_idx - q_idx`` (int64): exact buckets for the
    nearest ``num_buckets // 2`` distances (half that each way when bidirectional), then buckets
    logarithmically wider up to ``max_distance``, beyond which all distances share the last one."""
    n = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros(n.shape, dtype=np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (n > 0) * num_buckets
        n = np.abs(n)
    else:
        n = -np.minimum(n, 0)  # causal: only keys at or before the query
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


def relative_position_buckets(
    L: int, S: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False
) -> np.ndarray:
    """The bucket of every distance ``q_idx - kv_idx`` from ``-(S - 1)`` to ``L - 1``, as the int64
    vector ``buckets[q_idx - kv_idx + S - 1]`` that :func:`bucketed_relative_bias` reads."""
    distance = np.arange(-(S - 1), L, dtype=np.int64)  # q_idx - kv_idx
    return t5_bucket(-distance, bidirectional, num_buckets, max_distance)


def dense_bias(table, buckets, L: int, S: int):
    """The same bias as an ``(heads, L, S)`` array or tensor (``table[:, buckets[i - j + S - 1]]``):
    what a library without ``score_mod`` materialises (for comparisons and tests)."""
    idx = np.arange(L)[:, None] - np.arange(S)[None, :] + S - 1
    if buckets is not None:
        idx = np.asarray(buckets)[idx]
    if hasattr(table, "detach"):  # a torch tensor: the gather stays differentiable
        import torch

        return table[:, torch.from_numpy(idx)]
    return np.asarray(table)[:, idx]
