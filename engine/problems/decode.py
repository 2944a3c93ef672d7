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
from .packed import check_cu_seqlens, check_distinct_writes, sequence_of_rows
from .pages import check_no_write_into_history
from .pages import check_pages as _check_pages
from .sinks import validate_sinks

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

    Packed queries (``cu_seqlens_q``, int64 ``(B + 1,)``, not None): ``query`` is
    ``(total, Hq, D)``, ``key``/``value`` ``(total, Hkv, D/Dv)`` or None, and sequence b owns rows
    ``cu_seqlens_q[b] ... cu_seqlens_q[b + 1] - 1`` (``new_lens[b]`` of them, 0 allowed); ``L`` is
    ``total`` and ``L_new`` is ``total`` when key/value are given, else 0.
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
    cu_seqlens_q: np.ndarray | None = None

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    @property
    def packed(self) -> bool:
        """Whether the queries are packed with ``cu_seqlens_q`` (a ragged number per sequence)."""
        return self.cu_seqlens_q is not None

    @property
    def q_lens(self) -> np.ndarray:
        """Query rows of each sequence, int64 (B,)."""
        if self.packed:
            return np.diff(self.cu_seqlens_q)
        return np.full(self.batch, self.L, dtype=np.int64)

    @property
    def new_lens(self) -> np.ndarray:
        """New keys written into each sequence's cache, int64 (B,)."""
        if self.packed:
            return self.q_lens if self.L_new else np.zeros(self.batch, dtype=np.int64)
        return np.full(self.batch, self.L_new, dtype=np.int64)

    @property
    def seqlens_k(self) -> np.ndarray:
        """Keys each sequence attends (after the write): cache_seqlens + the new keys, int64 (B,)."""
        if self.packed:
            return self.cache_seqlens + self.new_lens
        return self.cache_seqlens + self.L_new

    @property
    def compute_dtype(self) -> np.dtype:
        """float64 for float64 queries, else float32 (16-bit queries and caches are widened)."""
        return np.dtype(np.float64 if self.dtype == np.float64 else np.float32)

    @property
    def out_shape(self) -> tuple:
        if self.packed:
            return (self.L, self.num_q_heads, self.Ev)
        return (self.batch, self.num_q_heads, self.L, self.Ev)

    @property
    def lse_shape(self) -> tuple:
        if self.packed:
            return (self.L, self.num_q_heads)
        return (self.batch, self.num_q_heads, self.L)

    def requirements(self) -> list[Requirement]:
        name, cache = dtype_name(self.dtype), dtype_name(self.cache_dtype)
        reqs = [
            Requirement("dtypes", name, f"query dtype {name} not supported for decoding (supports {{supported}})"),
            Requirement("cache_dtypes", cache, f"cache dtype {cache} not supported (supports {{supported}})"),
        ]
        if self.packed:
            reqs.append(Requirement("supports_cu_seqlens_q", True, "packed queries (cu_seqlens_q) are not supported"))
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
    cu_seqlens_q=None,
    sinks=None,
) -> DecodeProblem:
    """Check every argument of ``attention_with_kvcache`` and describe the call; writes nothing.

    ``query``, the caches and ``key``/``value`` are all host arrays or all device arrays
    (``__cuda_array_interface__``: torch CUDA, CuPy, Numba); ``cache_seqlens``, ``page_table`` and
    ``cu_seqlens_q`` are host arrays either way (their values are checked here)."""
    q = any_array(query, "query")
    kc = any_array(k_cache, "k_cache")
    vc = any_array(v_cache, "v_cache")
    on_device = isinstance(q, DeviceArray)
    packed = cu_seqlens_q is not None
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
        if packed and name == "query":
            if a.ndim != 3:
                raise ValueError(f"with cu_seqlens_q, query must be packed (total, Hq, D), got shape {tuple(a.shape)}")
        elif a.ndim != 4:
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
    if packed:
        L, Hq, E = q.shape
        cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", L, f"query {tuple(q.shape)}")
        B = len(cu_q) - 1
        sizes = (("batch (len(cu_seqlens_q) - 1)", B), ("query heads", Hq), ("head size D", E))
    else:
        cu_q = None
        B, Hq, L, E = q.shape
        sizes = (("batch", B), ("query heads", Hq), ("L (new query rows)", L), ("head size D", E))
    for name, n in sizes:
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
            if packed:
                if len(shape) != 3 or shape[0] != L or shape[1] != Hkv or shape[2] != width:
                    raise ValueError(
                        f"with cu_seqlens_q, {name} must be packed as the query: (total, Hkv, "
                        f"{'D' if name == 'key' else 'Dv'}) = ({L}, {Hkv}, {width}), got {tuple(shape)}"
                    )
            elif len(shape) != 4 or shape[0] != B or shape[1] != Hkv or shape[3] != width:
                raise ValueError(
                    f"{name} must have shape (B, Hkv, L_new, {'D' if name == 'key' else 'Dv'}) = "
                    f"({B}, {Hkv}, L_new, {width}), got {tuple(shape)}"
                )
            if not is_floating(a.dtype):  # written converted to the cache dtype (nearest even)
                raise TypeError(
                    f"{name} must have a floating dtype (it is converted to the cache's {cache_dtype}), got {a.dtype}"
                )
        if not packed and kn.shape[2] != vn.shape[2]:
            raise ValueError(
                f"key and value must hold the same number of new tokens, got {tuple(kn.shape)} and {tuple(vn.shape)}"
            )
        L_new = kn.shape[0] if packed else kn.shape[2]
        for name, a, given in (("k_cache", kc, k_cache), ("v_cache", vc, v_cache)):
            if not a.flags.writeable:
                raise ValueError(f"{name} is read-only, but key/value are to be written into it")
            if not _its_own_memory(a, given):
                raise ValueError(
                    f"{name} must be an array the new entries can be written into, got "
                    f"{_layout_of(given)}: it is read through a copy (native byte order, aligned), "
                    "and the write would go to the copy"
                )
        if pt is not None and (share_memory(pt, kc) or share_memory(pt, vc)):
            raise ValueError(
                "page_table must not share memory with k_cache or v_cache: the new entries would "
                "overwrite page indices the write and the attention then read"
            )

    seqlens = _seqlens(cache_seqlens, B)
    new_lens = np.diff(cu_q) if packed and L_new else L_new
    # seqlens > capacity - new_lens, not seqlens + new_lens > capacity: the sum of an entry near
    # int64's largest and the new keys would wrap negative and pass (then write out of bounds)
    over = np.nonzero(seqlens > capacity - new_lens)[0]
    if over.size:
        b = int(over[0])
        n_new = int(new_lens[b]) if packed and L_new else int(L_new)
        what = (
            f"writing {n_new} new keys at cache_seqlens[{b}] = {seqlens[b]} needs {int(seqlens[b]) + n_new} slots"
            if n_new
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
    need = seqlens + new_lens  # no entry is near int64's largest now
    if pt is not None and not packed:
        _check_pages(pt, need, seqlens, L_new, page_size, num_pages)
    elif pt is not None:  # page indices as above; the ragged writes' slots checked apart
        _check_pages(pt, need, seqlens, 0, page_size, num_pages)
        if L_new:
            seq, index = sequence_of_rows(cu_q)
            check_distinct_writes(pt, seq, seqlens[seq] + index, page_size)
            check_no_write_into_history(pt, seqlens, new_lens, page_size, num_pages)

    is_causal = check_bool(is_causal, "is_causal")
    return_lse = check_bool(return_lse, "return_lse")
    scale_f = check_scale(scale, E, f"query={tuple(q.shape)}")
    win = _window(window)
    splits = None if num_splits is None else _int_arg(num_splits, "num_splits", 1)
    if splits is not None and splits > MAX_NUM_SPLITS:  # each split is a (B*Hq*L, Dv) buffer
        raise ValueError(f"num_splits must be <= {MAX_NUM_SPLITS} (FlashAttention's limit), got {splits}")
    # the mods see absolute positions: q_idx = S_b - L_b + i, kv_idx < S_b; a plan's later calls
    # may take any from 0 to the cache's capacity, so the bounds probe takes all of those
    q_lo = int((need - (np.diff(cu_q) if packed else L)).min())
    positions = ((min(q_lo, 0), capacity - 1), (0, capacity - 1))
    mods = validate_mods(score_mod, mask_mod, None, mod_args, B, Hq, L, 0, positions=positions)
    mods.pop("block_mask", None)
    sinks = validate_sinks(sinks, Hq)
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
        cu_seqlens_q=cu_q,
        sinks=sinks,
        **mods,
    )


_INT64_MAX = int(np.iinfo(np.int64).max)


def _its_own_memory(arr, given) -> bool:
    """Whether ``arr`` (what ``any_array`` made of the argument ``given``) is ``given``'s memory,
    not a copy: ``native`` copies a NumPy array in a foreign byte order or unaligned, and a
    list becomes a new array. Device arrays and torch tensors are used in place."""
    if arr is given or isinstance(arr, DeviceArray):
        return True
    if isinstance(given, np.ndarray):
        return given.dtype.isnative and given.flags.aligned
    if type(given).__module__.startswith("torch"):
        return True  # a CPU tensor's memory, viewed (engine.problems.arrays.as_array)
    try:
        return np.may_share_memory(arr, given)
    except TypeError:
        return False


def _layout_of(given) -> str:
    """What ``given`` is, with its article: "an unaligned array (float32, shape ...)", "a list"."""
    if isinstance(given, np.ndarray):
        what = [] if given.dtype.isnative else [f"byte order {given.dtype.byteorder!r}"]
        what += [] if given.flags.aligned else ["unaligned"]
        desc = f"{', '.join(what)} array ({given.dtype}, shape {given.shape})"
        return ("an " if desc[0] in "aeiou" else "a ") + desc
    return f"{type(given).__module__}.{type(given).__qualname__}".removeprefix("builtins.")


def _seqlens(cache_seqlens, B: int) -> np.ndarray:
    if isinstance(cache_seqlens, (bool, np.bool_)):
        raise TypeError("cache_seqlens must be an int or an integer array of shape (B,), got a bool")
    if isinstance(cache_seqlens, (int, np.integer)):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        if cache_seqlens > _INT64_MAX:
            raise ValueError(f"cache_seqlens must be at most {_INT64_MAX} (int64), got {cache_seqlens}")
        return np.full(B, int(cache_seqlens), dtype=np.int64)
    else:
        arr = host_array(cache_seqlens, "cache_seqlens")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"cache_seqlens must hold integers (int32), got dtype {arr.dtype}")
        if arr.shape != (B,):
            raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(arr.shape)}")
        if arr.dtype.kind == "u" and arr.size:  # above int64's largest an entry would wrap negative
            big = np.nonzero(arr > _INT64_MAX)[0]
            if big.size:
                raise ValueError(
                    f"cache_seqlens must be at most {_INT64_MAX} (int64), got "
                    f"cache_seqlens[{int(big[0])}] = {arr[big[0]]}"
                )
        s = arr.astype(np.int64)  # a copy: the caller may advance theirs while we hold this one
    bad = np.nonzero(s < 0)[0]
    if bad.size:
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{int(bad[0])}] = {s[bad[0]]}")
    return s


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
