"""The call plan of ``scaled_dot_product_attention`` (see ``engine.plan``).

The key holds the signature; :func:`run_cached` does, for a call whose key has a plan, exactly the
checks whose outcome the key does not fix, with the functions the full validation uses
(``check_scale``, ``validate_dropout``, ``native_mod_args``, the block mask's ``mod_args``
identity), then rebuilds the problem from the plan and runs it. Calls outside the common case
(device arrays, torch tensors, causal-bias objects, non-bool flags, odd ``mod_args``) have no key
and take the full path every time.
"""

from __future__ import annotations

import numpy as np

from ..problems.arrays import native_mod_args
from ..problems.attention import validate_dropout
from ..problems.base import check_scale
from ..problems.mod_bounds import mod_ranges, probe_mod_bounds
from . import Plan, array_key, fast_problem, lookup, mod_args_key, runtime_token, store

__all__ = ["forward_key", "run_cached", "remember"]

#: the problem fields a call may change without changing its signature
_PER_CALL = ("query", "key", "value", "attn_mask", "scale", "mod_args", "dropout_p", "dropout_seed")


def forward_key(
    query, key, value, attn_mask, is_causal, enable_gqa, backend, return_lse, score_mod, mask_mod, block_mask, mod_args
):
    """The signature of a call, or None when it takes the full path every time."""
    nd = np.ndarray  # (array_key written out: a call costs a tenth of a microsecond here)
    if type(query) is not nd or type(key) is not nd or type(value) is not nd:
        return None
    mk = None
    if attn_mask is not None:
        mk = array_key(attn_mask)
        if mk is None:
            return None
    # only the bools themselves (1 == True, and hashes alike, but is refused by validation)
    if (is_causal is not True and is_causal is not False) or (enable_gqa is not True and enable_gqa is not False):
        return None
    if (return_lse is not True and return_lse is not False) or type(backend) is not str:
        return None
    ak = mod_args_key(mod_args)
    if ak is None:
        return None
    return (
        query.shape,
        query.dtype,
        query.flags.num,
        key.shape,
        key.dtype,
        key.flags.num,
        value.shape,
        value.dtype,
        value.flags.num,
        mk,
        is_causal,
        enable_gqa,
        backend,
        return_lse,
        score_mod,
        mask_mod,
        block_mask,
        ak,
        runtime_token(),
    )


def run_cached(key, query, key_, value, attn_mask, scale, mod_args, block_mask, dropout_p, dropout_seed):
    """``(out, lse)`` of a call through the plan stored under ``key``, or None when there is none
    (or the call's dropout differs from the plan's: the full path then decides)."""
    plan = lookup(key)
    if plan is None:
        return None
    info = plan.extra
    if scale is None and info.default_scale is not None:
        scale = info.default_scale
    else:
        scale = check_scale(scale, info.E, info.shapes)
    if dropout_p.__class__ is float and dropout_p == 0.0 and dropout_seed is None:
        p, seed = 0.0, None
    else:
        p, seed = validate_dropout(dropout_p, dropout_seed, True)
    if (p > 0) != info.dropout:  # the op was chosen with (or without) dropout in mind
        return None
    if mod_args:
        if block_mask is not None:
            if mod_args is not block_mask.mod_args:
                return None  # the full validation's error
        else:
            mod_args = native_mod_args(mod_args)
    elif block_mask is not None:
        mod_args = block_mask.mod_args
    if info.mod_probe is not None:  # the arrays' shapes and the numbers are the call's
        probe_mod_bounds(info.mod_probe[0], info.mod_probe[1], mod_args, info.mod_probe[2])
    views = info.views
    if views is None:
        plain = plan.plain
        if plain is not None:  # no problem object: the runner takes the arrays and values
            return plain(query, key_, value, scale, mod_args)
    else:
        query, key_, value = (
            a if view is None else np.broadcast_to(a.reshape(view[0]), view[1])
            for a, view in zip((query, key_, value), views)
        )
    problem = fast_problem(
        plan,
        {
            "query": query,
            "key": key_,
            "value": value,
            "attn_mask": attn_mask,
            "scale": scale,
            "mod_args": mod_args,
            "dropout_p": p,
            "dropout_seed": seed,
        },
    )
    return plan.run(problem)


class _Info:
    __slots__ = ("default_scale", "E", "shapes", "dropout", "views", "mod_probe")


def remember(key, problem, backend, op, query, key_, value, attn_mask) -> None:
    """Store the plan of a call that the full path has just validated and dispatched: only for
    host problems that are not empty, whose arrays are the caller's (native byte order, aligned:
    no copy) or broadcast views of them (``_broadcast_heads``: the same view is rebuilt per call)."""
    if key is None or problem.on_device or problem.is_empty or problem.attn_mask is not attn_mask:
        return
    views = []
    for given, held in zip((query, key_, value), (problem.query, problem.key, problem.value)):
        if not (given.dtype.isnative and given.flags.aligned):
            return  # validation copied it: the full path each time
        if held is given:
            views.append(None)
        elif held.shape != given.shape:  # a zero-stride view of the caller's array
            views.append(((1,) * (held.ndim - given.ndim) + given.shape, held.shape))
        else:
            return
    info = _Info()
    info.default_scale = check_scale(None, problem.E, "") if problem.E else None
    info.E = problem.E
    info.shapes = f"query={tuple(problem.query.shape)}"
    info.dropout = problem.dropout_p > 0
    info.views = None if all(v is None for v in views) else tuple(views)
    info.mod_probe = None
    if problem.score_mod is not None or problem.mask_mod is not None:
        ranges = mod_ranges(problem.batch, problem.num_q_heads, (0, problem.L - 1), (0, problem.S - 1))
        info.mod_probe = (problem.score_mod, problem.mask_mod, ranges)
    plan = Plan(backend, op, problem, _PER_CALL, info)
    if info.views is not None:  # the runner's plain path takes the arrays as the caller gave them
        plan.plain = None
    store(key, plan)
