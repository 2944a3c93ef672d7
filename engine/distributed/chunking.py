"""Chunk plans: how the query, key, value and mask of a distributed call are cut into blocks.

The rules (each broken rule is a ``ValueError`` naming the arrays and their chunks, raised while
the graph is built, before any task runs; Dask's own functions would rechunk silently, this
module moves data behind the caller's back only where grouped-query heads need it, below):

* the feature axes (E of query and key, Ev of value) are whole: one chunk each;
* key and value are chunked alike along S;
* along a batch axis, every array of that axis's full size has the same chunks (arrays of size 1
  broadcast, as in torch);
* heads: query and output share their head chunks; key/value heads are chunked alike. With
  ``enable_gqa`` (each key/value head serves ``g`` query heads) the query's head chunks decide:
  any chunks are taken (one head per chunk is how dask users chunk), and the key/value heads are
  rechunked to serve them; a query chunk that straddles a group boundary without holding whole
  groups is split there for the computation (the query and a head-chunked mask are split too,
  and the output is given the query's chunks back). The values are those of one call either way;
* an ``attn_mask`` given as a dask array is chunked like the scores ``(..., Hq, L, S)`` on every
  axis where it is not of size 1.

Inputs that are not dask arrays (NumPy arrays, torch CPU tensors) are chunked for the caller:
along an axis that a dask input fixes, as that input; otherwise by :func:`default_chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from ..problems.arrays import as_array as _as_array
from ..problems.attention import AttentionProblem, validate_attention_args
from ..runtime.config import DASK_CHUNK_ROWS

__all__ = ["ChunkPlan", "plan_chunks", "default_chunks"]


def default_chunks(
    batch_shape: tuple, heads: int, rows: int, group: int = 1, target_rows: int = DASK_CHUNK_ROWS
) -> tuple:
    """Chunks ``(batch chunks..., head chunks, row chunks)`` that the engine gives NumPy inputs.

    Rows (L or S) are cut into chunks of ``min(rows, target_rows)`` (the last one shorter); then
    heads, in whole groups of ``group`` (GQA), are grouped until a chunk holds about
    ``target_rows`` rows; then entries of the last batch axis likewise; other batch axes are one
    entry per chunk. ``target_rows`` is ``engine.runtime.config.DASK_CHUNK_ROWS`` (2048) by default.

    :param batch_shape: the batch dims.
    :param heads: query heads.
    :param rows: L or S.
    :param group: query heads per key/value head (GQA), kept in one chunk.
    :param target_rows: rows per chunk aimed at.
    """
    per_row = max(1, min(rows, target_rows))
    row_chunks = _split(rows, per_row)
    units = max(1, heads // max(group, 1))
    per_head = group * max(1, min(units, target_rows // per_row // max(group, 1)))
    head_chunks = _split(heads, min(per_head, heads) if heads else 1)
    batch_chunks = []
    for d, n in enumerate(batch_shape):
        if d == len(batch_shape) - 1:
            per_b = max(1, target_rows // (per_row * max(1, min(per_head, heads))))
            batch_chunks.append(_split(n, min(per_b, n) if n else 1))
        else:
            batch_chunks.append(_split(n, 1))
    return tuple(batch_chunks) + (head_chunks, row_chunks)


def _split(n: int, size: int) -> tuple:
    if n == 0:
        return (0,)
    return (size,) * (n // size) + ((n % size,) if n % size else ())


@dataclass(frozen=True)
class ChunkPlan:
    """A validated distributed call: the inputs as dask arrays of one rank and agreed chunks.

    ``query``/``key``/``value``/``mask`` have rank ``len(batch_shape) + 3`` (inputs of lower
    rank get leading axes of size 1; 2-D inputs a head axis of 1, ``two_d`` True). ``batch_chunks``,
    ``head_chunks`` (output heads), ``q_chunks`` (L) and ``k_chunks`` (S) are the output's blocks.
    ``problem`` is the engine's validation of stand-in arrays of the same shapes and dtypes.
    """

    problem: AttentionProblem
    query: da.Array
    key: da.Array
    value: da.Array
    mask: da.Array | None
    batch_shape: tuple
    batch_chunks: tuple
    head_chunks: tuple
    q_chunks: tuple
    k_chunks: tuple
    two_d: bool
    #: the key/value head block each output head block reads (GQA: several query head blocks
    #: may read one key/value block); ``range(len(head_chunks))`` without GQA
    kv_head_block: tuple = ()
    #: the output's head chunks as the query asked for them (``head_chunks`` may split a query
    #: chunk at a GQA group boundary for the computation)
    out_head_chunks: tuple = ()

    @property
    def rank(self) -> int:
        return len(self.batch_shape) + 3

    def block_index(self, arr: da.Array, bidx: tuple, hi: int, qi: int | None, kj: int | None, kind: str) -> tuple:
        """The block of ``arr`` (query, key, value or mask) that output block (bidx, hi) at
        query chunk qi and key chunk kj reads: index 0 along axes where ``arr`` broadcasts."""
        nb = len(self.batch_shape)
        idx = [0 if arr.shape[d] == 1 else bidx[d] for d in range(nb)]
        kv = kind in ("key", "value") and self.kv_head_block
        idx.append(0 if arr.shape[nb] == 1 else self.kv_head_block[hi] if kv else hi)
        if kind == "query":
            idx += [qi, 0]
        elif kind in ("key", "value"):
            idx += [kj, 0]
        else:  # mask: (..., heads, L, S)
            idx += [0 if arr.shape[nb + 1] == 1 else qi, 0 if arr.shape[nb + 2] == 1 else kj]
        return (arr.name,) + tuple(idx)


def _stand_in(x):
    """A zero-stride array of ``x``'s shape and dtype: validation reads shapes and dtypes only."""
    return np.broadcast_to(np.zeros((), dtype=x.dtype), x.shape)


def plan_chunks(
    query, key, value, attn_mask, is_causal, scale, enable_gqa, return_lse, score_mod, mask_mod, mod_args
) -> ChunkPlan:
    """Validate a distributed call (the engine's own checks, then the chunk rules) and make
    every input a dask array with agreed chunks. Raises ``TypeError``/``ValueError``."""
    arrays = {}
    for name, x in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        if x is None and name == "attn_mask":
            continue
        arrays[name] = x if isinstance(x, da.Array) else _as_array(x, name)
    problem = validate_attention_args(
        _stand_in(arrays["query"]),
        _stand_in(arrays["key"]),
        _stand_in(arrays["value"]),
        _stand_in(arrays["attn_mask"]) if "attn_mask" in arrays else None,
        is_causal,
        scale,
        enable_gqa,
        return_lse,
        score_mod,
        mask_mod,
        None,
        mod_args,
    )
    two_d = problem.lead_shape == ()
    batch_shape = problem.batch_shape
    rank = len(batch_shape) + 3
    padded = {n: _pad(x, rank) for n, x in arrays.items()}
    Hq, H, g = problem.num_q_heads, problem.num_kv_heads, problem.group
    nb = len(batch_shape)

    # -- the feature axes are whole
    for name in ("query", "key", "value"):
        x = padded[name]
        if isinstance(x, da.Array) and len(x.chunks[-1]) > 1:
            what = "Ev" if name == "value" else "E"
            raise ValueError(
                f"{name}'s feature axis ({what} = {x.shape[-1]}) is split into chunks "
                f"{x.chunks[-1]}; attention needs whole rows: rechunk it with "
                f"{name}.rechunk({{-1: -1}})"
            )

    # -- chunks each dask input asks for, axis by axis
    defaults = default_chunks(batch_shape, Hq, problem.L, g)
    batch_chunks = []
    for d, n in enumerate(batch_shape):
        asks = {nm: x.chunks[d] for nm, x in padded.items() if isinstance(x, da.Array) and x.shape[d] == n > 1}
        batch_chunks.append(_agree(asks, f"batch axis {d} (size {n})", defaults[d] if n > 1 else (n,)))
    out_heads, head_chunks, kv_heads, kv_block = _head_chunks(padded, Hq, H, g, nb, defaults[nb])
    q_asks = {"query": padded["query"].chunks[nb + 1]} if isinstance(padded["query"], da.Array) else {}
    k_asks = {nm: padded[nm].chunks[nb + 1] for nm in ("key", "value") if isinstance(padded[nm], da.Array)}
    mask = padded.get("attn_mask")
    if isinstance(mask, da.Array):
        if mask.shape[nb + 1] == problem.L > 1:
            q_asks["attn_mask"] = mask.chunks[nb + 1]
        if mask.shape[nb + 2] == problem.S > 1:
            k_asks["attn_mask"] = mask.chunks[nb + 2]
    q_chunks = _agree(q_asks, f"L (axis -2 of query, -2 of attn_mask; L = {problem.L})", defaults[-1])
    k_default = default_chunks(batch_shape, Hq, problem.S, g)[-1]
    if set(k_asks) == {"key", "value"} and k_asks["key"] != k_asks["value"]:
        raise ValueError(
            f"key and value must be chunked alike along S (axis -2), got key chunks "
            f"{k_asks['key']} and value chunks {k_asks['value']}; rechunk one like the other"
        )
    k_chunks = _agree(k_asks, f"S (axis -2 of key and value, -1 of attn_mask; S = {problem.S})", k_default)

    # -- every input as a dask array with those chunks
    out = {}
    for name, x in padded.items():
        want = [batch_chunks[d] if x.shape[d] > 1 else (x.shape[d],) for d in range(nb)]
        heads = x.shape[nb]
        if name in ("query", "attn_mask"):
            want.append(head_chunks if heads == Hq > 1 else (heads,))
        else:
            want.append((heads,) if heads == 1 else kv_heads)
        if name == "query":
            want += [q_chunks, (x.shape[-1],)]
        elif name in ("key", "value"):
            want += [k_chunks, (x.shape[-1],)]
        else:
            want += [
                q_chunks if x.shape[nb + 1] > 1 else (x.shape[nb + 1],),
                k_chunks if x.shape[nb + 2] > 1 else (x.shape[nb + 2],),
            ]
        want = tuple(tuple(c) for c in want)
        if isinstance(x, da.Array):
            if g > 1 and tuple(x.chunks[nb]) != want[nb]:  # GQA: heads aligned to the groups
                x = x.rechunk({nb: want[nb]})
            if tuple(x.chunks) != want:  # every rule above holds, so this is a broadcast axis
                raise ValueError(f"{name} has chunks {x.chunks}, expected {want} for these inputs")
            out[name] = x
        else:
            out[name] = da.from_array(x, chunks=want)
    return ChunkPlan(
        problem=problem,
        query=out["query"],
        key=out["key"],
        value=out["value"],
        mask=out.get("attn_mask"),
        batch_shape=batch_shape,
        batch_chunks=tuple(batch_chunks),
        head_chunks=tuple(head_chunks),
        q_chunks=tuple(q_chunks),
        k_chunks=tuple(k_chunks),
        two_d=two_d,
        kv_head_block=tuple(kv_block),
        out_head_chunks=tuple(out_heads),
    )


def _pad(x, rank: int):
    """``x`` with leading axes of size 1 up to ``rank`` (a 2-D (L, E) input gets a head axis)."""
    missing = rank - x.ndim
    if missing <= 0:
        return x
    return x[(None,) * missing] if isinstance(x, da.Array) else x.reshape((1,) * missing + x.shape)


def _agree(asks: dict, axis: str, default: tuple) -> tuple:
    """The chunks every dask input asks for along ``axis``, or ``default`` if none asks."""
    distinct = {tuple(c) for c in asks.values()}
    if len(distinct) > 1:
        detail = ", ".join(f"{n} {tuple(c)}" for n, c in asks.items())
        raise ValueError(
            f"the inputs are chunked differently along {axis}: {detail}; rechunk them "
            "alike (the engine does not rechunk them for you)"
        )
    return distinct.pop() if distinct else tuple(default)


def _head_chunks(padded: dict, Hq: int, H: int, g: int, nb: int, default: tuple) -> tuple:
    """``(asked, heads, kv_chunks, kv_block)``: the output's head chunks as the query (and mask)
    ask for them; the head chunks computed (``asked`` split at GQA group boundaries where a chunk
    straddles one without holding whole groups); the key/value head chunks; and, per computed
    head chunk, the index of the key/value head chunk it reads."""
    q, mask = padded["query"], padded.get("attn_mask")
    asks, kv = {}, {}
    if isinstance(q, da.Array) and q.shape[nb] == Hq > 1:
        asks["query"] = tuple(q.chunks[nb])
    if isinstance(mask, da.Array) and mask.shape[nb] == Hq > 1:
        asks["attn_mask"] = tuple(mask.chunks[nb])
    for name in ("key", "value"):
        x = padded[name]
        if isinstance(x, da.Array) and x.shape[nb] == H > 1:
            kv[name] = tuple(x.chunks[nb])
    if set(kv) == {"key", "value"} and kv["key"] != kv["value"]:
        raise ValueError(
            f"key and value must be chunked alike along the head axis (-3), got key {kv['key']} and value {kv['value']}"
        )
    axis = f"the head axis (-3; {Hq} query heads, {H} key/value heads)"
    if g <= 1:
        if kv and H == Hq:
            asks.update(kv)
        heads = _agree(asks, axis, default)
        return heads, heads, heads, tuple(range(len(heads)))
    if not asks and kv:  # only key/value chunk the heads: their groups of query heads
        name, chunks = next(iter(kv.items()))
        asks[name] = tuple(c * g for c in chunks)
    asked = _agree(asks, axis, default)
    heads = _split_at_groups(asked, g)
    kv_chunks, kv_block = _kv_blocks(heads, g)
    return asked, heads, kv_chunks, kv_block


def _split_at_groups(chunks: tuple, g: int) -> tuple:
    """``chunks`` (of query heads) with every chunk that straddles a boundary of the groups of
    ``g`` heads, without being whole groups, cut there: each piece is then whole groups or inside
    one group. One head per chunk, or chunks of whole groups, come back unchanged."""
    out, start = [], 0
    for c in chunks:
        end = start + c
        if c == 0 or (start % g == 0 and end % g == 0) or start // g == (end - 1) // g:
            out.append(c)
        else:
            first, last = -(-start // g) * g, end // g * g  # group boundaries inside the chunk
            pieces = [first - start, last - first, end - last]
            out += [p for p in pieces if p]
        start = end
    return tuple(out)


def _kv_blocks(heads: tuple, g: int) -> tuple:
    """``(kv_chunks, kv_block)`` for query head chunks that are whole groups or inside one group:
    the key/value heads each chunk reads (``[start // g, ceil(end / g))``) partition the key/value
    heads; consecutive chunks inside one group read the same block."""
    kv_chunks, kv_block, start, last = [], [], 0, None
    for c in heads:
        end = start + c
        span = (start // g, -(-end // g))
        if c and span != last:
            kv_chunks.append(span[1] - span[0])
            last = span
        kv_block.append(max(len(kv_chunks) - 1, 0))
        start = end
    return tuple(kv_chunks) or (0,), tuple(kv_block)
