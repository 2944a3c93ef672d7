"""The call plan of ``attention_with_kvcache`` (see ``engine.plan``).

The key holds the signature: every array's shape, dtype and flags (so writeability and
C-contiguity of the caches), whether ``cache_seqlens`` is an int or an array (and that array's
signature), the page table's signature, the flags, the window, ``num_splits``, the mods, the
backend and the runtime token. :func:`run_cached` then checks what two calls with one key can
still differ in, before anything is written: the caches' overlap (array identity), the scale,
``cache_seqlens`` values against the capacity, the page table's values (the full validation's own
``_check_pages``) and the ``mod_args`` contents. Where a value is wrong it hands the call back to
the full validation, which raises its usual error, so a cached call fails exactly as the first one
would have.
"""

from __future__ import annotations

import numpy as np

from ..kernels.seqlens import _check_seqlens, _checked_seqlens_k
from ..problems.arrays import native_mod_args
from ..problems.base import check_scale
from ..problems.decode import _check_pages
from ..problems.mod_bounds import mod_ranges, probe_mod_bounds
from ..runtime.entry_points import Bound
from . import Plan, fast_problem, lookup, mod_args_key, runtime_token, store

__all__ = ["decode_key", "run_cached", "remember"]

_PER_CALL = ("query", "k_cache", "v_cache", "key", "value", "cache_seqlens", "page_table", "scale", "mod_args")


def decode_key(
    query,
    k_cache,
    v_cache,
    key,
    value,
    cache_seqlens,
    page_table,
    is_causal,
    window,
    score_mod,
    mask_mod,
    mod_args,
    return_lse,
    num_splits,
    backend,
):
    """The signature of a call, or None when it takes the full path every time."""
    nd = np.ndarray
    if type(query) is not nd or type(k_cache) is not nd or type(v_cache) is not nd:
        return None
    if key is None and value is None:
        new = None
    elif type(key) is nd and type(value) is nd:
        new = (key.shape, key.dtype, key.flags.num, value.shape, value.dtype, value.flags.num)
    else:
        return None
    t = type(cache_seqlens)
    if t is nd:
        seq = (cache_seqlens.shape, cache_seqlens.dtype, cache_seqlens.flags.num)
    elif t is int:
        seq = int
    else:
        return None
    if page_table is None:
        pages = None
    elif type(page_table) is nd:
        pages = (page_table.shape, page_table.dtype, page_table.flags.num)
    else:
        return None
    if (is_causal is not True and is_causal is not False) or (return_lse is not True and return_lse is not False):
        return None
    if window is not None and not (type(window) is tuple and len(window) == 2 and all(type(w) is int for w in window)):
        return None
    if (num_splits is not None and type(num_splits) is not int) or type(backend) is not str:
        return None
    ak = mod_args_key(mod_args)
    if ak is None:
        return None
    return (
        query.shape,
        query.dtype,
        query.flags.num,
        k_cache.shape,
        k_cache.dtype,
        k_cache.flags.num,
        v_cache.shape,
        v_cache.dtype,
        v_cache.flags.num,
        new,
        seq,
        pages,
        is_causal,
        window,
        score_mod,
        mask_mod,
        ak,
        return_lse,
        num_splits,
        backend,
        runtime_token(),
    )


def run_cached(plan_key, query, k_cache, v_cache, key, value, cache_seqlens, page_table, scale, mod_args):
    """``(out, lse)`` of a call through the plan stored under ``plan_key``; None when there is no
    plan, or when a value is wrong (the full validation then raises its error)."""
    plan = lookup(plan_key)
    if plan is None:
        return None
    info = plan.extra
    if np.may_share_memory(k_cache, v_cache):
        return None
    if scale is None:
        scale = info.default_scale
    else:
        scale = check_scale(scale, info.E, info.shapes)
    plain = plan.plain
    if plain is not None:  # no page table: the runner takes seqlens_k and the arrays
        L_new = info.L_new
        seqlens_k = np.empty(info.B, np.int64)
        if type(cache_seqlens) is int:
            most = cache_seqlens + L_new
            if cache_seqlens < 0 or most > info.capacity:
                return None
            seqlens_k.fill(most)
            total = most * info.B
        else:
            most, total = info.checked_seqlens_k(cache_seqlens, L_new, info.capacity, seqlens_k)
            if most < 0:
                return None
        if mod_args:
            mod_args = native_mod_args(mod_args)
        if info.mod_probe is not None:
            _probe_mods(info, mod_args, seqlens_k.min() if type(cache_seqlens) is not int else most)
        return plain(query, k_cache, v_cache, key, value, seqlens_k, most, total, scale, mod_args)
    if type(cache_seqlens) is int:
        if cache_seqlens < 0 or cache_seqlens + info.L_new > info.capacity:
            return None
        seqlens = np.full(info.B, cache_seqlens, dtype=np.int64)
    else:
        seqlens = np.empty(info.B, dtype=np.int64)
        if info.check_seqlens(cache_seqlens, info.L_new, info.capacity, seqlens) < 0:
            return None
    if page_table is not None:
        if key is not None and (np.may_share_memory(page_table, k_cache) or np.may_share_memory(page_table, v_cache)):
            return None  # the write would overwrite page indices: the full validation says so
        _check_pages(page_table, seqlens + info.L_new, seqlens, info.L_new, info.page_size, info.num_pages)
    if mod_args:
        mod_args = native_mod_args(mod_args)
    if info.mod_probe is not None:
        _probe_mods(info, mod_args, seqlens.min() + info.L_new)
    problem = fast_problem(
        plan,
        {
            "query": query,
            "k_cache": k_cache,
            "v_cache": v_cache,
            "key": key,
            "value": value,
            "cache_seqlens": seqlens,
            "page_table": page_table,
            "scale": scale,
            "mod_args": mod_args,
        },
    )
    return plan.run(problem)


class _Info:
    __slots__ = (
        "default_scale",
        "E",
        "shapes",
        "B",
        "L",
        "L_new",
        "capacity",
        "page_size",
        "num_pages",
        "check_seqlens",
        "checked_seqlens_k",
        "mod_probe",
    )


def remember(plan_key, problem, backend, op, arrays) -> None:
    """Store the plan of a call the full path has just validated and run: host arrays that
    validation used as they are (no byte-order or alignment copy)."""
    if plan_key is None or problem.on_device:
        return
    held = (problem.query, problem.k_cache, problem.v_cache, problem.key, problem.value, problem.page_table)
    if any(h is not a for h, a in zip(held, arrays)):
        return
    info = _Info()
    info.mod_probe = None
    if problem.score_mod is not None or problem.mask_mod is not None:
        if problem.L_new < problem.L and problem.cu_seqlens_q is not None:
            return  # packed rows with no new keys: their lowest q_idx needs cu_seqlens_q (full path)
        info.mod_probe = (problem.score_mod, problem.mask_mod, problem.batch, problem.num_q_heads)
    info.L = problem.L
    info.default_scale = check_scale(None, problem.E, "")
    info.E = problem.E
    info.shapes = f"query={tuple(problem.query.shape)}"
    info.B, info.L_new, info.capacity = problem.batch, problem.L_new, problem.capacity
    info.page_size, info.num_pages = problem.page_size, problem.num_pages
    info.check_seqlens = Bound(_check_seqlens)  # the key fixes cache_seqlens' type
    info.checked_seqlens_k = Bound(_checked_seqlens_k)
    store(plan_key, Plan(backend, op, problem, _PER_CALL, info))


def _probe_mods(info, mod_args, lowest_seqlen_k) -> None:
    """``probe_mod_bounds`` at the positions validation takes (``problems.decode``): q_idx from
    ``min(S_b - L, 0)`` and both up to the capacity; ``S_b - L >= 0`` where every query row writes
    a key."""
    score_mod, mask_mod, batch, heads = info.mod_probe
    q_lo = min(int(lowest_seqlen_k) - info.L, 0) if info.L_new < info.L else 0
    top = info.capacity - 1
    probe_mod_bounds(score_mod, mask_mod, mod_args, mod_ranges(batch, heads, (q_lo, top), (0, top)))
