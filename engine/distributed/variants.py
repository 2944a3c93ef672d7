"""``engine.distributed.apply_variant``: a variant over a dask array of sequences.

One task per chunk of sequences calls the variant on its chunk. The variant (its parameters) and
the call's other keywords are one key of the graph: Dask sends them to each worker once, and
every task on that worker reads the same object (never a copy per task).
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from ..problems.arrays import as_array as _as_array
from ..runtime.config import DASK_CHUNK_ROWS
from ..variant import Variant
from .threads import task_threads

__all__ = ["apply_variant"]


class VariantCall:
    """The shared part of every task: the variant and the keywords every chunk gets as they are."""

    def __init__(self, variant: Variant, static: dict):
        self.variant = variant
        self.static = static

    def __call__(self, x, key, value, per_sequence: dict):
        with task_threads():
            out, _ = self.variant(x, key, value, **self.static, **per_sequence)
        return out


def _run(call: VariantCall, x, key, value, names: tuple, *per_sequence):
    return call(x, key, value, dict(zip(names, per_sequence)))


def apply_variant(variant, query, key=None, value=None, *, key_padding_mask=None, **kwargs):
    """Run ``variant`` over every sequence of a dask array; return the output as a dask array.

    :param variant: an ``engine.Variant`` instance (``engine.get_variant(name, **params)``).
    :type variant: Variant
    :param query: ``(N, L, E)`` (``(L, N, E)`` for a variant built with ``batch_first=False``),
        a dask array chunked along N only (L and E whole), or a NumPy array, which is chunked
        along N into chunks of about ``engine.runtime.config.DASK_CHUNK_ROWS`` (2048) query rows.
    :type query: dask.array.Array | ndarray
    :param key: optional, as the variant takes it, chunked along N like ``query``.
    :type key: dask.array.Array | ndarray | None
    :param value: likewise.
    :type value: dask.array.Array | ndarray | None
    :param key_padding_mask: ``(N, S)``, chunked along N like ``query`` (NumPy: chunked for you).
    :type key_padding_mask: dask.array.Array | ndarray | None
    :param kwargs: other keywords of the variant's call. A dask array here is per sequence: its
        first axis is N, chunked like ``query``. Anything else (``is_causal``, an ``(L, S)``
        ``attn_mask``, ``backend``) is passed as it is to every chunk, shipped once per worker
        with the variant. ``need_weights=True`` is refused: the result is the output only.
    :type kwargs: Any
    :return: the variant's output, a dask array ``(N, L, E_out)`` (or ``(L, N, E_out)``) chunked
        along N like ``query``.
    :raises TypeError: a non-variant (and the variant's own type errors, from a call on zero
        sequences made here), before any task runs.
    :raises ValueError: unbatched inputs, chunks along L or features, or chunks that differ along N
        (and the variant's own value errors), before any task runs.
    """
    if not isinstance(variant, Variant):
        raise TypeError(
            f"variant must be an engine.Variant instance (engine.get_variant(name, ...)), got {type(variant).__name__}"
        )
    if kwargs.get("need_weights"):
        raise ValueError(
            "apply_variant returns the output only; need_weights=True is not supported "
            "(call the variant on a slice of the sequences for their weights)"
        )
    axis = 0 if variant.batch_first else 1
    q = _as_dask(query, "query", axis, None)
    n_chunks = q.chunks[axis]
    seqs = {"key": key, "value": value}
    arrays = {}
    for name, x in seqs.items():
        if x is not None:
            arrays[name] = _as_dask(x, name, axis, n_chunks)
    per_seq = {}
    if key_padding_mask is not None:
        per_seq["key_padding_mask"] = _as_dask(key_padding_mask, "key_padding_mask", 0, n_chunks, ndim=2)
    static = {}
    for name, x in kwargs.items():
        if isinstance(x, da.Array):
            per_seq[name] = _as_dask(x, name, 0, n_chunks, ndim=None)
        else:
            static[name] = x
    if q.shape[axis] != 0:
        for name, x in list(arrays.items()) + list(per_seq.items()):
            n_axis = axis if name in seqs else 0
            if x.shape[n_axis] != q.shape[axis]:
                raise ValueError(
                    f"{name} has {x.shape[n_axis]} sequences (axis {n_axis} of shape "
                    f"{x.shape}) but query has {q.shape[axis]} (axis {axis} of {q.shape})"
                )

    meta = _probe(variant, q, arrays, per_seq, static, axis)
    call = VariantCall(variant, static)
    token = dask.base.tokenize(
        q.name,
        *(x.name for x in arrays.values()),
        *(x.name for x in per_seq.values()),
        sorted(per_seq),
        _content_token(call),
    )
    call_key = ("variant-call-" + token,)
    name = "variant-" + token
    dsk = {call_key: call}
    names = tuple(per_seq)
    for i in range(len(n_chunks)):
        idx = lambda x, a: (x.name,) + tuple(i if d == a else 0 for d in range(x.ndim))  # noqa: E731
        dsk[(name,) + tuple(i if d == axis else 0 for d in range(3))] = (
            _run,
            call_key,
            idx(q, axis),
            idx(arrays["key"], axis) if "key" in arrays else None,
            idx(arrays["value"], axis) if "value" in arrays else None,
            names,
            *(idx(x, 0) for x in per_seq.values()),
        )
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[q, *arrays.values(), *per_seq.values()])
    out_chunks = tuple(n_chunks if d == axis else (meta.shape[d],) for d in range(3))
    return da.Array(graph, name, out_chunks, meta=np.empty((0, 0, 0), meta.dtype))


def _content_token(call: VariantCall) -> str:
    """A token of the variant (class, settings, parameters) and the static keywords, so a call
    after ``load_state_dict`` never reuses the keys of an earlier one; a fresh one if they cannot
    be hashed."""
    try:
        return dask.base.tokenize(type(call.variant).__qualname__, call.variant.__dict__, call.static)
    except Exception:
        import uuid

        return uuid.uuid4().hex


def _as_dask(x, name: str, axis: int, n_chunks, ndim: int | None = 3) -> da.Array:
    """``x`` as a dask array chunked along ``axis`` only (``n_chunks`` there when given)."""
    if not isinstance(x, da.Array):
        arr = _as_array(x, name)
        if ndim is not None and arr.ndim != ndim:
            raise ValueError(
                f"{name} must have {ndim} dimensions (apply_variant takes batched sequences), got shape {arr.shape}"
            )
        if n_chunks is None:
            length = arr.shape[1 - axis] if arr.ndim > 1 else 1
            per = max(1, DASK_CHUNK_ROWS // max(length, 1))
            chunks = tuple(min(per, arr.shape[axis]) or 1 if d == axis else -1 for d in range(arr.ndim))
        else:
            chunks = tuple(n_chunks if d == axis else -1 for d in range(arr.ndim))
        return da.from_array(arr, chunks=chunks)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions (apply_variant takes batched sequences), got shape {x.shape}"
        )
    if x.ndim <= axis:
        raise ValueError(f"{name} of shape {x.shape} has no sequence axis {axis}")
    for d, c in enumerate(x.chunks):
        if d != axis and len(c) > 1:
            raise ValueError(
                f"{name} may be chunked along its sequence axis ({axis}) only, got chunks "
                f"{x.chunks}: rechunk with {name}.rechunk({{{d}: -1}})"
            )
    if n_chunks is not None and tuple(x.chunks[axis]) != tuple(n_chunks) and x.shape[axis] == sum(n_chunks):
        raise ValueError(
            f"{name} must be chunked like query along the sequences (axis {axis}): "
            f"query {tuple(n_chunks)}, {name} {x.chunks[axis]}"
        )
    return x


def _probe(variant: Variant, q: da.Array, arrays: dict, per_seq: dict, static: dict, axis: int):
    """The variant on zero sequences, here: its output's feature size and dtype, and its
    argument checks, before any task runs."""

    def none(x, a):
        shape = list(x.shape)
        shape[a] = 0
        return np.zeros(shape, x.dtype)

    q0 = none(q, axis)
    key0 = none(arrays["key"], axis) if "key" in arrays else None
    value0 = none(arrays["value"], axis) if "value" in arrays else None
    extra = {n: none(x, 0) for n, x in per_seq.items()}
    out, _ = variant(q0, key0, value0, **static, **extra)
    return np.asarray(out)
