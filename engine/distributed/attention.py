"""``engine.distributed.scaled_dot_product_attention``: the functional API over dask arrays.

The graph, for each output block (batch chunk, head chunk, query chunk):

* one ``attention-pair`` task per key chunk the block can see (``tasks.attend_pair``: the
  ``cpu`` backend with ``return_lse=True``); pairs that see nothing are left out when the graph
  is built (causal, ``mask_mod``), pairs that see everything carry no mask;
* a tree of ``attention-merge`` tasks (``engine.merge_attention``) over consecutive groups of
  ``split_every`` partial results, in key-chunk order, like ``dask.array.reduction``; the tree is
  a function of the chunks alone, never of which task finished first;
* ``attention-out`` and ``attention-lse`` blocks taken from the root of the tree.

A block that sees no key at all is zeros with ``lse = -inf``, as in one call.
"""

from __future__ import annotations

import hashlib
import itertools

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from ..dispatch import get_backend
from ..runtime.errors import NotSupportedError
from . import tasks, visibility
from .chunking import ChunkPlan, plan_chunks

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    return_lse=False,
    split_every=None,
):
    """Attention with ``torch.nn.functional.scaled_dot_product_attention``'s semantics, over
    dask arrays, as a lazy dask array.

    Shapes as :func:`engine.scaled_dot_product_attention`: ``(..., Hq, L, E)``, ``(..., H, S,
    E)``, ``(..., H, S, Ev)`` -> ``(..., Hq, L, Ev)``, batch dims broadcast as torch; float32 or
    float64 (the ``cpu`` backend computes every task). ``attn_mask`` (boolean, True = may
    attend, or floating, added), ``is_causal`` (top-left), ``scale``, ``enable_gqa``,
    ``score_mod``/``mask_mod``/``mod_args`` mean what they mean there; the mods see global
    indices ``(b, h, q_idx, kv_idx)``, as in one call.

    Inputs may be dask arrays or NumPy arrays (chunked for you by
    :func:`engine.distributed.default_chunks`); see :mod:`engine.distributed.chunking` for the
    chunk rules. Nothing is computed here: call ``.compute()``, ``.persist()`` or ``.to_zarr()``
    on the result, on whatever scheduler Dask uses (a ``distributed`` client, or the local
    threaded scheduler).

    :param query: ``(..., Hq, L, E)``: a dask array, or a NumPy array or torch CPU tensor (chunked
        for you).
    :type query: dask.array.Array | ndarray
    :param key: ``(..., H, S, E)``, likewise.
    :type key: dask.array.Array | ndarray
    :param value: ``(..., H, S, Ev)``, likewise.
    :type value: dask.array.Array | ndarray
    :param attn_mask: boolean (True = may attend) or floating (added), broadcastable to ``(..., Hq,
        L, S)``; a dask array is chunked like the scores.
    :type attn_mask: dask.array.Array | ndarray | None
    :param is_causal: top-left causal.
    :type is_causal: bool
    :param scale: None is ``1/sqrt(E)``.
    :type scale: float | None
    :param enable_gqa: grouped-query attention (any query head chunks).
    :type enable_gqa: bool
    :param score_mod: as ``engine.scaled_dot_product_attention``'s, at global indices; picklable.
    :type score_mod: Callable | None
    :param mask_mod: likewise.
    :type mask_mod: Callable | None
    :param mod_args: the mods' extra arguments.
    :type mod_args: tuple
    :param return_lse: also return the log-sum-exp.
    :type return_lse: bool
    :param split_every: partial results merged per merge task (the tree's fan-in, >= 2); default
        Dask's ``split_every`` setting, else 4 (as ``dask.array.reduction``).
    :type split_every: int | None
    :return: ``out``, a dask array of shape ``(..., Hq, L, Ev)`` chunked like the query along
        batch, heads and L, with Ev whole; with ``return_lse=True`` also ``lse``, shape
        ``(..., Hq, L)``, natural log, ``-inf`` where a row sees no key.
    :raises TypeError: an argument of the wrong kind (the engine's own checks), before any task runs.
    :raises ValueError: bad shapes or values, or chunks that break the rules, before any task runs.
    :raises engine.NotSupportedError: float16 or bfloat16 inputs (each chunk's partial result would be
        rounded to 16 bits before the merge: pass float32), or inputs the ``cpu`` backend cannot run
        (E = 0).
    """
    plan = plan_chunks(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, return_lse, score_mod, mask_mod, mod_args
    )
    problem = plan.problem
    split_every = _split_every(split_every)
    if 0 in (problem.L, problem.S, problem.batch, problem.num_q_heads, problem.Ev):
        out, lse = _empty(plan)
        return (out, lse) if return_lse else out
    reasons = get_backend("cpu").not_supported_reasons(problem)
    if problem.dtype.name not in ("float32", "float64"):  # partial results would round to 16 bits
        reasons.append(
            f"dtype {problem.dtype.name}: engine.distributed merges partial results in the "
            "input dtype, so it takes float32 or float64 (cast 16-bit inputs to float32)"
        )
    if reasons:
        raise NotSupportedError(
            f"engine.distributed computes on the cpu backend, which cannot run these inputs: {'; '.join(reasons)}",
            {"cpu": reasons},
        )
    kinds = _pair_kinds(plan, score_mod, mask_mod)
    out, lse = _build_graph(plan, kinds, split_every, score_mod, mask_mod)
    if plan.out_head_chunks != plan.head_chunks:  # a query head chunk split at a GQA group boundary
        nb = len(plan.batch_shape)
        out, lse = out.rechunk({nb: plan.out_head_chunks}), lse.rechunk({nb: plan.out_head_chunks})
    return (out, lse) if return_lse else out


def _split_every(split_every) -> int:
    if split_every is None:
        split_every = dask.config.get("split_every", None) or 4
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    return int(split_every)


def _pair_kinds(plan: ChunkPlan, score_mod, mask_mod) -> np.ndarray:
    """``(n_batch_blocks..., n_head_blocks, nq, nk)``: EMPTY, PARTIAL or FULL for every pair."""
    p = plan.problem
    shape = tuple(len(c) for c in plan.batch_chunks) + (len(plan.head_chunks), len(plan.q_chunks), len(plan.k_chunks))
    kinds = np.full(shape, visibility.FULL, np.int8)
    if p.is_causal:
        kinds = visibility.combine(kinds, np.broadcast_to(visibility.causal_kinds(plan.q_chunks, plan.k_chunks), shape))
    if p.mask_mod is not None:
        kinds = visibility.combine(
            kinds,
            visibility.mask_mod_kinds(
                p.mask_mod,
                p.mod_args,
                plan.batch_shape,
                p.num_q_heads,
                p.L,
                p.S,
                plan.batch_chunks,
                plan.head_chunks,
                plan.q_chunks,
                plan.k_chunks,
            ),
        )
    return kinds


def _mods_token(score_mod, mask_mod) -> str:
    """A name for this pair of mods that a worker may cache compiled mods under: a hash of their
    pickled form (code and captured values, or module and name for importable functions)."""
    if score_mod is None and mask_mod is None:
        return ""
    import cloudpickle

    from ..problems.mods import python_function

    blobs = []
    for what, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        try:
            blobs.append(cloudpickle.dumps(None if fn is None else python_function(fn)))
        except Exception as exc:
            raise TypeError(f"{what} must be picklable to run on Dask workers: {exc}") from None
    return hashlib.sha256(b"\0".join(blobs)).hexdigest()[:32]


def _build_graph(plan: ChunkPlan, kinds: np.ndarray, split_every: int, user_score_mod, user_mask_mod):
    """The graph of pair, merge, out and lse tasks; the caller's mods (not their compiled form)
    go to the workers, inside the one spec every task shares."""
    p = plan.problem
    q, k, v, mask = plan.query, plan.key, plan.value, plan.mask
    mods_token = _mods_token(user_score_mod, user_mask_mod)
    token = dask.base.tokenize(
        q.name,
        k.name,
        v.name,
        None if mask is None else mask.name,
        p.scale,
        p.is_causal,
        p.group,
        p.num_q_heads,
        mods_token,
        p.mod_args,
        split_every,
        kinds,
    )
    spec_key = ("attention-spec-" + token,)
    pair_name, merge_name = "attention-pair-" + token, "attention-merge-" + token
    out_name, lse_name = "attention-out-" + token, "attention-lse-" + token
    spec = tasks.AttentionSpec(
        scale=p.scale,
        enable_gqa=p.group > 1,
        score_mod=user_score_mod,
        mask_mod=user_mask_mod,
        mod_args=tuple(p.mod_args),
        mods_token=mods_token,
    )
    attn = {spec_key: spec}
    outs, lses = {}, {}
    nb = len(plan.batch_shape)
    b_starts = [visibility.starts(c) for c in plan.batch_chunks]
    h_starts = visibility.starts(plan.head_chunks)
    q_starts, k_starts = visibility.starts(plan.q_chunks), visibility.starts(plan.k_chunks)
    has_mods = p.has_mods
    dtype = p.dtype
    for bidx in itertools.product(*(range(len(c)) for c in plan.batch_chunks)):
        bmap = _batch_map(plan, bidx, b_starts) if has_mods else None
        bshape = tuple(plan.batch_chunks[d][bidx[d]] for d in range(nb))
        for hi, hc in enumerate(plan.head_chunks):
            for qi, lc in enumerate(plan.q_chunks):
                parts = []
                for kj in range(len(plan.k_chunks)):
                    kind = kinds[bidx + (hi, qi, kj)]
                    if kind == visibility.EMPTY:
                        continue
                    a0, c0 = int(q_starts[qi]), int(k_starts[kj])
                    causal = tasks.CAUSAL_NONE
                    if p.is_causal and not (kind == visibility.FULL):
                        causal = tasks.CAUSAL_TOP_LEFT if a0 == c0 else tasks.CAUSAL_OFFSET
                    info = tasks.PairInfo(
                        causal=causal,
                        offset=a0 - c0,
                        # a pair the mask_mod fully allows needs no mask_mod, unless a score_mod
                        # is there anyway (one compiled kernel instead of two)
                        use_mask_mod=p.mask_mod is not None and (kind != visibility.FULL or p.score_mod is not None),
                        bmap=bmap,
                        h0=int(h_starts[hi]),
                        q0=a0,
                        k0=c0,
                    )
                    key = (pair_name,) + bidx + (hi, qi, kj)
                    attn[key] = (
                        tasks.attend_pair,
                        spec_key,
                        plan.block_index(q, bidx, hi, qi, kj, "query"),
                        plan.block_index(k, bidx, hi, qi, kj, "key"),
                        plan.block_index(v, bidx, hi, qi, kj, "value"),
                        None if mask is None else plan.block_index(mask, bidx, hi, qi, kj, "mask"),
                        info,
                    )
                    parts.append(key)
                root = _merge_tree(attn, merge_name, bidx + (hi, qi), parts, split_every)
                if root is None:  # this block sees no key
                    root = (merge_name, "empty") + bidx + (hi, qi)
                    attn[root] = (tasks.empty_block, bshape + (hc, lc, p.Ev), bshape + (hc, lc), dtype.str)
                out_key = (out_name,) + ((qi, 0) if plan.two_d else bidx + (hi, qi, 0))
                lse_key = (lse_name,) + ((qi,) if plan.two_d else bidx + (hi, qi))
                outs[out_key] = (tasks.take, root, 0, plan.two_d)
                lses[lse_key] = (tasks.take, root, 1, plan.two_d)

    deps = [x for x in (q, k, v, mask) if x is not None]
    attn_name = "attention-" + token
    graph = HighLevelGraph.from_collections(attn_name, attn, dependencies=deps)
    lead_chunks = () if plan.two_d else tuple(plan.batch_chunks) + (tuple(plan.head_chunks),)
    out_chunks = lead_chunks + (tuple(plan.q_chunks), (p.Ev,))
    lse_chunks = lead_chunks + (tuple(plan.q_chunks),)
    arrays = []
    for name, layer, chunks in ((out_name, outs, out_chunks), (lse_name, lses, lse_chunks)):
        layers = dict(graph.layers)
        layers[name] = layer
        dependencies = dict(graph.dependencies)
        dependencies[name] = {attn_name}
        arrays.append(
            da.Array(HighLevelGraph(layers, dependencies), name, chunks, meta=np.empty((0,) * len(chunks), dtype))
        )
    return tuple(arrays)


def _merge_tree(graph: dict, name: str, block: tuple, parts: list, split_every: int):
    """Add merge tasks over ``parts`` (keys of ``(out, lse)``) in groups of ``split_every``,
    level by level, in order; return the root's key (``None`` for no parts)."""
    level = 0
    while len(parts) > 1:
        merged = []
        for g in range(0, len(parts), split_every):
            group = parts[g : g + split_every]
            if len(group) == 1:
                merged.append(group[0])
                continue
            key = (name, level) + block + (g // split_every,)
            graph[key] = (tasks.merge_parts, list(group))
            merged.append(key)
        parts, level = merged, level + 1
    return parts[0] if parts else None


def _batch_map(plan: ChunkPlan, bidx: tuple, b_starts: list) -> np.ndarray:
    """Global flattened batch index of each entry of batch block ``bidx`` (C order)."""
    if not plan.batch_shape:
        return np.zeros(1, np.int64)
    ranges = [np.arange(b_starts[d][i], b_starts[d][i] + plan.batch_chunks[d][i]) for d, i in enumerate(bidx)]
    grid = np.meshgrid(*ranges, indexing="ij")
    return np.ravel_multi_index(tuple(grid), plan.batch_shape).reshape(-1).astype(np.int64)


def _empty(plan: ChunkPlan):
    """The lazy result of a problem with a zero size (S = 0: zeros and lse = -inf, as torch)."""
    p = plan.problem
    return da.zeros(p.out_shape, dtype=p.dtype), da.full(p.lse_shape, -np.inf, dtype=p.dtype)
