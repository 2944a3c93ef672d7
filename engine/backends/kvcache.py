"""Host-side cache operations shared by the backends' decode ops: writing the new entries in place,
gathering one sequence's keys and values through its pages (the oracle's view of a cache), and the
split-KV heuristic (how many chunks a sequence's keys are split into)."""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ..problems.decode import DecodeProblem
from ..problems.packed import sequence_of_rows
from ..runtime.config import DECODE_MAX_SPLITS, DECODE_MIN_SPLIT_KEYS

__all__ = ["write_new_entries", "new_entries_written", "gather_sequence", "cache_slots", "pick_num_splits"]


def cache_slots(problem: DecodeProblem, b, positions: np.ndarray):
    """``(pages, offsets)`` of token ``positions`` of sequence(s) ``b``, as index arrays that
    broadcast together (NumPy broadcasts them when indexing). A contiguous cache is one page per
    sequence (page ``b``, ``page_size = S_max``)."""
    if problem.page_table is None:
        return b, positions
    return problem.page_table[b, positions // problem.page_size], positions % problem.page_size


def _written_slots(problem: DecodeProblem):
    """``(pages, offsets, keys, values)``: where the new entries go and what goes there, as index
    arrays and sources of one shape (``(B, L_new)`` + head dims, or ``(total,)`` + head dims for
    packed queries: token t of sequence b goes to position ``cache_seqlens[b] + t``). Every slot
    gets what its entry held before the call: values that lie in k_cache's memory are copied, as
    the keys are written first (NumPy's assignment already copies a source overlapping its own
    target)."""
    key, value = problem.key, problem.value
    if np.may_share_memory(value, problem.k_cache):
        value = value.copy()
    if problem.packed:
        seq, index = sequence_of_rows(problem.cu_seqlens_q)
        pages, offsets = cache_slots(problem, seq, problem.cache_seqlens[seq] + index)
        return pages, offsets, key, value
    b = np.arange(problem.batch)[:, None]
    pos = problem.cache_seqlens[:, None] + np.arange(problem.L_new)[None, :]
    pages, offsets = cache_slots(problem, b, pos)
    # advanced indices (B, L_new) around a slice: the target is (B, L_new, Hkv, D)
    return pages, offsets, np.swapaxes(key, 1, 2), np.swapaxes(value, 1, 2)


def write_new_entries(problem: DecodeProblem) -> None:
    """``k_cache``/``v_cache`` slots ``cache_seqlens[b] ... + L_new - 1`` of every sequence b get
    ``key[b]``/``value[b]`` (converted to the cache dtype, rounded to nearest even); with packed
    queries, sequence b's rows of the packed key/value. Validation has checked every index, so
    this cannot fail half-way."""
    if problem.key is None or problem.L_new == 0:
        return
    pages, offsets, keys, values = _written_slots(problem)
    problem.k_cache[pages, :, offsets] = keys
    problem.v_cache[pages, :, offsets] = values


@contextlib.contextmanager
def new_entries_written(problem: DecodeProblem):
    """Write the new entries (:func:`write_new_entries`, host caches) for the duration of the
    block; if the block raises (a mod that does not compile, an allocation that fails), the slots
    get their old contents back before the error propagates, so a failed call leaves the caches as
    they were."""
    if problem.key is None or problem.L_new == 0:
        yield
        return
    pages, offsets, keys, values = _written_slots(problem)
    old_k = problem.k_cache[pages, :, offsets]  # advanced indexing: copies
    old_v = problem.v_cache[pages, :, offsets]
    problem.k_cache[pages, :, offsets] = keys
    problem.v_cache[pages, :, offsets] = values
    try:
        yield
    except BaseException:
        problem.k_cache[pages, :, offsets] = old_k
        problem.v_cache[pages, :, offsets] = old_v
        raise


def gather_sequence(problem: DecodeProblem, b: int):
    """Keys and values sequence ``b`` attends, ``(Hkv, S_b, D)`` and ``(Hkv, S_b, Dv)``, copied out
    of its pages in the cache dtype (call after :func:`write_new_entries`)."""
    pages, offsets = cache_slots(problem, b, np.arange(int(problem.seqlens_k[b])))
    return (
        np.swapaxes(problem.k_cache[pages, :, offsets], 0, 1),
        np.swapaxes(problem.v_cache[pages, :, offsets], 0, 1),
    )


def pick_num_splits(tasks: int, max_keys: int, threads: int) -> int:
    """How many chunks to split each sequence's keys into, when the caller did not say.

    ``tasks`` = sequences x cache heads x row blocks. Enough tasks already keep every thread busy:
    1. Otherwise the split balances the waves of tasks over the threads (a wave at 3/4 occupancy
    wastes a quarter of the machine): the smallest split whose balance is within 85% of the best
    one, no split holding fewer than ``DECODE_MIN_SPLIT_KEYS`` keys (FlashAttention's heuristic for
    its ``num_splits=0``, with threads for streaming multiprocessors).
    """
    if tasks >= threads or max_keys < 2 * DECODE_MIN_SPLIT_KEYS:
        return 1  # (checked first: the common case costs nothing)
    most = max(1, min(DECODE_MAX_SPLITS, max_keys // DECODE_MIN_SPLIT_KEYS))
    balance = []
    for s in range(1, most + 1):
        waves = tasks * s / threads
        balance.append(waves / math.ceil(waves))
    best = max(balance)
    return next(s for s, e in enumerate(balance, 1) if e >= 0.85 * best)
