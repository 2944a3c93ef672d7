"""The decoding problem (``attention_with_kvcache``) and its checks: everything is checked before any
cache slot is written, so a call that fails leaves the caches as they were.

The result is a :class:`DecodeProblem`, the normalised description the backends' decode ops
consume. Errors are ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong shape or value)
and name the argument, the sequence and the values involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .arrays import DeviceArray, any_array, caller_array, host_array, is_floating, share_memory  # new-import
from .base import Problem, Requirement, check_bool, check_scale, dtype_name  # new-import
from .mods import validate_mods  # new-import

__all__ = ["DecodeProblem", "validate_decode_args"]


@dataclass(frozen=True, kw_only=True)
class DecodeProblem(Problem):
    """A validated ``attention_with_kvcache`` call.

    Arrays are NumPy arrays, or the caller's device arrays when ``on_device`` (query, caches,
    key/value; ``cache_seqlens`` and ``page_table`` are always host arrays). ``k_cache``/``v_cache``
    are the caller's caches (they are written in place). Contiguous caches are
    ``(B, Hkv, S_max, D)``; paged ones are ``(num_pages, Hkv, page_size, D)`` with ``page_table``
    ``(B, max_pages)``. ``cache_seqlens`` (int64 copy, (B,)) is where ``key``/``value``
    (``(B, Hkv, L_new, D/Dv)`` or None) are written; ``seqlens_k = cache_seqlens + L_new`` keys
    are then attended by each sequence. ``window`` is ``(left, right)`` with -1 for unbounded.
    """

    missing_op_reason: ClassVar[str] = "KV-cache decoding (attention_with_kvcache) is not supported by this backend"

    k_cache: Any
    v_cache: Any
    key: Any
    value: Any
    cache_seqlens: np.ndarray
    page_table: Any
    batch: int
    L_new: int
    page_size: int
    num_pages: int
    capacity: int
    cache_dtype: np.dtype
    is_causal: bool
    window: tuple
    num_splits: int | None

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    @property
    def seqlens_k(self) -> np.ndarray:
        """Keys each sequence attends (after the write): cache_seqlens + L_new, int64 (B,)."""
        return self.cache_seqlens + self.L_new

    @property
    def compute_dtype(self) -> np.dtype:
        """float64 for float64 queries, else float32 (16-bit queries and caches are widened)."""
        return np.dtype(np.float64 if self.dtype == np.float64 else np.float32)

    @property
    def out_shape(self) -> tuple:
        return (self.batch, self.num_q_heads, self.L, self.Ev)

    @property
    def lse_shape(self) -> tuple:
        return (self.batch, self.num_q_heads, self.L)

    def requirements(self) -> list[Requirement]:
        name, cache = dtype_name(self.dtype), dtype_name(self.cache_dtype)
        reqs = [
            Requirement("dtypes", name, f"query dtype {name} not supported for decoding (supports {{supported}})"),
            Requirement("cache_dtypes", cache, f"cache dtype {cache} not supported (supports {{supported}})"),
        ]
        return reqs + super().requirements()[1:]  # the base's dtype requirement is the query's, said above


#: the most splits ``num_splits`` may force (FlashAttention's ``flash_attn_with_kvcache`` allows 128);
#: the backends also use no more splits than the longest sequence has keys
MAX_NUM_SPLITS = 128


def _int_arg(x, name: str, minimum: int) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def validate_decode_args(
    query,
    k_cache,
    v_cache,
    key=None,
    value=None,
    *,
    cache_seqlens,
    page_table=None,
    is_causal=True,
    scale=None,
    window=None,
    score_mod=None,
    mask_mod=None,
    mod_args=(),
    return_lse=False,
    num_splits=None,
) -> DecodeProblem:
    """Check every argument of ``attention_with_kvcache`` and describe the call; writes nothing.

    ``query``, the caches and ``key``/``value`` are all host arrays or all device arrays
    (``__cuda_array_interface__``: torch CUDA, CuPy, Numba); ``cache_seqlens`` and ``page_table``
    are host arrays either way (their values are checked here)."""
    q = any_array(query, "query")
    kc = any_array(k_cache, "k_cache")
    vc = any_array(v_cache, "v_cache")
    on_device = isinstance(q, DeviceArray)
    for name, a in (("query", q), ("k_cache", kc), ("v_cache", vc)):
        if isinstance(a, DeviceArray) != on_device:
            raise TypeError(
                f"query, k_cache and v_cache must all be host arrays or all device arrays; query is a "
                f"{'device' if on_device else 'host'} array and {name} is not"
            )
        if not is_floating(a.dtype):
            raise TypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got "
                f"{a.dtype} with shape {tuple(a.shape)}"
            )
        if a.ndim != 4:
            raise ValueError(
                f"{name} must have 4 dimensions, got shape {tuple(a.shape)} (query (B, Hq, L, D); "
                "caches (B, Hkv, S_max, D), or (num_pages, Hkv, page_size, D) with page_table)"
            )
    dtype = np.dtype(q.dtype)
    compute = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    if kc.dtype != vc.dtype:
        raise TypeError(f"k_cache and v_cache must share one dtype, got {kc.dtype} and {vc.dtype}")
    cache_dtype = np.dtype(kc.dtype)
    if cache_dtype != compute and cache_dtype.itemsize != 2:  # float16 or bfloat16 (floating checked)
        raise TypeError(
            f"the caches must be float16, bfloat16 or the compute dtype {compute} (float64 for "
            f"float64 queries, else float32); got caches of {cache_dtype} with a {dtype} query"
        )
    B, Hq, L, E = q.shape
    for name, n in (("batch", B), ("query heads", Hq), ("L (new query rows)", L), ("head size D", E)):
        if n < 1:
            raise ValueError(f"query must have {name} >= 1, got shape {tuple(q.shape)}")
    for name, a in (("k_cache", kc), ("v_cache", vc)):
        if not a.flags.c_contiguous:
            raise ValueError(
                f"{name} must be C-contiguous (it is written and read in place; a copy would not "
                f"do), got strides {a.strides} for shape {tuple(a.shape)}"
            )
    if share_memory(kc, vc):
        raise ValueError("k_cache and v_cache must not share memory (value writes would overwrite keys)")
    n0, Hkv, rows, Ek = kc.shape
    Ev = vc.shape[3]
    if vc.shape[:3] != kc.shape[:3]:
        raise ValueError(
            f"v_cache must match k_cache in all but its last dimension, got k_cache "
            f"{tuple(kc.shape)} and v_cache {tuple(vc.shape)}"
        )
    if Ek != E:
        raise ValueError(
            f"query and k_cache must have the same head size D, got query {tuple(q.shape)} and "
            f"k_cache {tuple(kc.shape)}"
        )
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(
            f"the cache's head count must divide the query's (grouped-query attention), got "
            f"{Hq} query heads and {Hkv} cache heads"
        )
    if Ev < 1:
        raise ValueError(f"v_cache must have a value head size >= 1, got shape {tuple(vc.shape)}")

    if page_table is None:
        pt, page_size, num_pages, capacity = None, rows, n0, rows
        if n0 != B:
            raise ValueError(
                f"a contiguous k_cache must have the query's batch size {B} first, got shape "
                f"{tuple(kc.shape)} (pass page_table for a paged cache)"
            )
    else:
        pt = host_array(page_table, "page_table")
        if pt.dtype.kind not in "iu":
            raise TypeError(f"page_table must hold integers (int32), got dtype {pt.dtype}")
        if pt.ndim != 2 or pt.shape[0] != B:
            raise ValueError(f"page_table must have shape (B, max_pages) = ({B}, ...), got {tuple(pt.shape)}")
        page_size, num_pages = rows, n0
        capacity = pt.shape[1] * page_size
        if page_size < 1:
            raise ValueError(f"paged caches need page_size >= 1, got k_cache {tuple(kc.shape)}")

    if (key is None) != (value is None):
        raise ValueError("pass key and value together (both new entries are written), or neither")
    kn = vn = None
    L_new = 0
    if key is not None:
        kn = any_array(key, "key")
        vn = any_array(value, "value")
        for name, a, width in (("key", kn, E), ("value", vn, Ev)):
            if isinstance(a, DeviceArray) != on_device:
                raise TypeError(f"{name} must be a {'device' if on_device else 'host'} array, as the caches are")
            shape = a.shape
            if len(shape) != 4 or shape[0] != B or shape[1] != Hkv or shape[3] != width:
                raise ValueError(
                    f"{name} must have shape (B, Hkv, L_new, {'D' if name == 'key' else 'Dv'}) = "
                    f"({B}, {Hkv}, L_new, {width}), got {tuple(shape)}"
                )
            if not is_floating(a.dtype):  # written converted to the cache dtype (nearest even)
                raise TypeError(
                    f"{name} must have a floating dtype (it is converted to the cache's {cache_dtype}), got {a.dtype}"
                )
        if kn.shape[2] != vn.shape[2]:
            raise ValueError(
                f"key and value must hold the same number of new tokens, got {tuple(kn.shape)} and {tuple(vn.shape)}"
            )
        L_new = kn.shape[2]
        for name, a in (("k_cache", kc), ("v_cache", vc)):
            if not a.flags.writeable:
                raise ValueError(f"{name} is read-only, but key/value are to be written into it")

    seqlens = _seqlens(cache_seqlens, B)
    need = seqlens + L_new
    over = np.nonzero(need > capacity)[0]
    if over.size:
        b = int(over[0])
        what = (
            f"writing {L_new} new keys at cache_seqlens[{b}] = {seqlens[b]} needs {need[b]} slots"
            if L_new
            else f"cache_seqlens[{b}] = {seqlens[b]}"
        )
        raise ValueError(
            f"{what}, but the cache holds {capacity} per sequence"
            + (
                f" (max_pages {pt.shape[1]} x page_size {page_size})"
                if pt is not None
                else f" (k_cache {tuple(kc.shape)})"
            )
        )
    if pt is not None:
        _check_pages(pt, need, seqlens, L_new, page_size, num_pages)

    is_causal = check_bool(is_causal, "is_causal")
    return_lse = check_bool(return_lse, "return_lse")
    scale_f = check_scale(scale, E, f"query={tuple(q.shape)}")
    win = _window(window)
    splits = None if num_splits is None else _int_arg(num_splits, "num_splits", 1)
    if splits is not None and splits > MAX_NUM_SPLITS:  # each split is a (B*Hq*L, Dv) buffer
        raise ValueError(f"num_splits must be <= {MAX_NUM_SPLITS} (FlashAttention's limit), got {splits}")
    mods = validate_mods(score_mod, mask_mod, None, mod_args, B, Hq, L, 0)
    mods.pop("block_mask", None)
    return DecodeProblem(
        query=caller_array(q),
        k_cache=caller_array(kc),
        v_cache=caller_array(vc),
        key=None if kn is None else caller_array(kn),
        value=None if vn is None else caller_array(vn),
        cache_seqlens=seqlens,
        page_table=pt,
        batch=B,
        num_q_heads=Hq,
        num_kv_heads=Hkv,
        L=L,
        L_new=L_new,
        E=E,
        Ev=Ev,
        page_size=page_size,
        num_pages=num_pages,
        capacity=capacity,
        dtype=dtype,
        cache_dtype=cache_dtype,
        is_causal=is_causal,
        scale=scale_f,
        window=win,
        return_lse=return_lse,
        num_splits=splits,
        on_device=on_device,
        **mods,
    )


def _seqlens(cache_seqlens, B: int) -> np.ndarray:
    if isinstance(cache_seqlens, (bool, np.bool_)):
        raise TypeError("cache_seqlens must be an int or an integer array of shape (B,), got a bool")
    if isinstance(cache_seqlens, (int, np.integer)):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        return np.full(B, int(cache_seqlens), dtype=np.int64)
    else:
        arr = host_array(cache_seqlens, "cache_seqlens")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"cache_seqlens must hold integers (int32), got dtype {arr.dtype}")
        if arr.shape != (B,):
            raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(arr.shape)}")
        s = arr.astype(np.int64)  # a copy: the caller may advance theirs while we hold this one
    bad = np.nonzero(s < 0)[0]
    if bad.size:
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{int(bad[0])}] = {s[bad[0]]}")
    return s


def _check_pages(
    pt: np.ndarray, need: np.ndarray, seqlens: np.ndarray, L_new: int, page_size: int, num_pages: int
) -> None:
    """Every page a sequence reads or writes is a valid page index, and no two sequences write one
    slot. Entries past a sequence's last page are never read (vLLM pads them with anything)."""
    used = (need + page_size - 1) // page_size
    cols = np.arange(pt.shape[1])
    live = cols[None, :] < used[:, None]
    bad = live & ((pt < 0) | (pt >= num_pages))
    if bad.any():
        b, j = (int(x[0]) for x in np.nonzero(bad))
        raise ValueError(
            f"page_table[{b}, {j}] = {pt[b, j]} is not a page of the cache (0..{num_pages - 1}); "
            f"sequence {b} uses its first {used[b]} pages"
        )
    if L_new and pt.shape[0] > 1:
        pos = seqlens[:, None] + np.arange(L_new)[None, :]
        slot = pt[np.arange(pt.shape[0])[:, None], pos // page_size].astype(np.int64) * page_size + pos % page_size
        flat = slot.reshape(-1)
        uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
        if (counts > 1).any():
            s = uniq[counts > 1][0]
            who = sorted({int(i) // L_new for i in np.nonzero(flat == s)[0]})
            raise ValueError(
                f"sequences {who} would write the same cache slot (page {s // page_size}, offset "
                f"{s % page_size}): their page_table rows share a page where new keys go"
            )
    if L_new:
        _check_no_write_into_history(pt, seqlens, L_new, page_size, num_pages)


def _check_no_write_into_history(pt: np.ndarray, seqlens: np.ndarray, L_new: int, page_size: int, num_pages: int):
    """No new key goes into a slot that a sequence reads as its history (its first
    ``cache_seqlens`` keys): with a shared prefix page, a sequence whose length ends inside that
    page would append over another's cached key (the torn-block hazard of paged serving; the caller
    copies the page first, copy on write). One pass marks the pages written to and finds them
    among the pages holding history; only where one is found (pages shared with a writer) are the
    slots compared."""
    B, width = pt.shape
    hist = (seqlens + page_size - 1) // page_size  # pages holding history (validated above)
    ncols = int(hist.max()) if B else 0
    if ncols == 0:
        return
    rows = np.arange(B)[:, None]
    pos = seqlens[:, None] + np.arange(L_new)[None, :]  # (B, L_new) positions written
    page = pt[rows, pos // page_size].astype(np.int64)
    written = np.zeros(num_pages, bool)
    written[page] = True
    # entries past a row's history may hold anything (vLLM pads with any value): clipped, then masked
    hits = written.take(pt[:, :ncols], mode="clip") & (np.arange(ncols)[None, :] < hist[:, None])
    own = seqlens // page_size  # a sequence appending to its own last, partial page: its history
    partial = np.nonzero(own < ncols)[0]  # there lies below what it writes, not a hazard
    hits[partial, own[partial]] = False
    if not hits.any():
        return
    offset = pos % page_size
    fill = np.clip(seqlens[:, None] - np.arange(ncols)[None, :] * page_size, 0, page_size)  # history slots
    for b2, j in zip(*np.nonzero(hits)):  # pages a writer shares: the slots decide
        p = pt[b2, j]
        for b, t in zip(*np.nonzero((page == p) & (offset < fill[b2, j]))):
            o = int(offset[b, t])
            whose = "its own" if b2 == b else f"sequence {b2}'s"
            raise ValueError(
                f"sequence {b} would write its new key {t} (position {int(pos[b, t])}) into page {p}, slot {o}, "
                f"which holds {whose} cached key at position {j * page_size + o} (cache_seqlens[{b2}] = "
                f"{int(seqlens[b2])}): page_table[{b}, {int(pos[b, t]) // page_size}] and page_table[{b2}, {j}] "
                f"name the same page; copy the shared page before appending to it (copy on write)"
            )


def _window(window) -> tuple:
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right), got {window!r}")
    out = []
    for name, w in zip(("left", "right"), window):
        if w is None:
            w = -1
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or w < -1:
            raise ValueError(f"window {name} must be an int >= 0, or -1/None for unbounded, got {w!r}")
        out.append(int(w))
    return tuple(out)
