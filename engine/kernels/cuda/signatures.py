"""The Numba argument types the ``cuda`` backend launches each kernel with, for
``numba.cuda.compile_ptx`` (the PTX tests and the GPU check compile every kernel without a GPU)."""

from __future__ import annotations

import numpy as np

from .storage import CACHE_BFLOAT16, CACHE_FLOAT16, CACHE_FLOAT32

__all__ = ["kernel_signature", "backward_signatures", "decode_signature", "merge_signature", "write_signature"]


def kernel_signature(storage, mask=None, mod_args=()):
    """The argument types the ``cuda`` backend launches the kernel with, for ``compile_ptx``.

    ``storage``: ``np.float16``, ``np.float32``, or ``np.uint16`` for bfloat16 bit patterns;
    ``mask``: the mask dtype (``np.bool_`` for a boolean mask and for the no-mask dummy; for float
    masks the storage dtype, to which host masks are cast: ``np.uint16`` bits for bfloat16, with
    ``mask_bf16``); ``mod_args``: example values of the mods' arguments (their types count).
    """
    from numba import from_dtype, typeof, types

    st = from_dtype(np.dtype(storage))
    mt = from_dtype(np.dtype(np.bool_ if mask is None else mask))
    args = types.Tuple(tuple(typeof(a) for a in mod_args))
    return (
        st[::1],
        st[::1],
        st[::1],
        mt[::1],
        types.int64[:, ::1],
        types.int64,
        types.int64,
        types.int64,
        types.float64,
        args,
        types.int8[:, :, :, ::1],
        st[:, :, :, ::1],
        st[:, :, ::1],
        types.uint64,
        types.uint64,
        types.uint64,
        types.float32,
    )


def backward_signatures(storage, mask=None, mod_args=(), lse=np.float32):
    """The argument types ``(preprocess, dkdv, dq)`` are launched with, for ``compile_ptx``.

    ``storage``: ``np.float16``, ``np.float32`` or ``np.uint16`` (bfloat16 bits); ``mask``: the
    mask dtype (``np.bool_`` for a boolean mask and the no-mask dummy); ``lse``: its dtype as
    launched (host lse is float32); ``mod_args``: example values of the mods' arguments.
    """
    from numba import from_dtype, typeof, types

    st = from_dtype(np.dtype(storage))
    mt = from_dtype(np.dtype(np.bool_ if mask is None else mask))
    lt = from_dtype(np.dtype(lse))
    args = types.Tuple(tuple(typeof(a) for a in mod_args))
    f3 = types.float32[:, :, ::1]
    meta = types.int64[:, ::1]
    drop = (types.uint64, types.uint64, types.uint64, types.float32)
    pre = (st[::1], st[::1], lt[::1], meta, types.int64, f3, f3)
    common = (st[::1], st[::1], st[::1], mt[::1], st[::1], meta, f3, f3, types.int64, types.int64, types.int64)
    common += (types.float64, args, types.int8[:, :, :, ::1])
    dkdv = common + (st[:, :, :, ::1], st[:, :, :, ::1]) + drop
    dq = common + (st[:, :, :, ::1], types.float32[:, :, :, ::1]) + drop
    return pre, dkdv, dq


def _storage_type(kind: int):
    from numba import types

    return {CACHE_FLOAT32: types.float32, CACHE_FLOAT16: types.float16, CACHE_BFLOAT16: types.uint16}[kind]


def decode_signature(cache_kind: int, mod_args=(), q_kind: int = CACHE_FLOAT32, q_strided: bool = False):
    """The argument types the backend launches ``_decode_split`` with, for ``compile_ptx``:
    host calls pass a C-order float32 query, device calls the caller's query (any strides)."""
    from numba import typeof, types

    st = _storage_type(cache_kind)
    qt = _storage_type(q_kind)
    return (
        qt[:, :, :, :] if q_strided else qt[:, :, :, ::1],
        st[:, :, :, ::1],
        st[:, :, :, ::1],
        types.int32[:, ::1],
        types.int64[::1],
        types.int64,
        types.int64,
        types.boolean,
        types.int64,
        types.int64,
        types.float64,
        types.Tuple(tuple(typeof(a) for a in mod_args)),
        types.float32[:, :, ::1],
        types.float32[:, ::1],
    )


def merge_signature(out_kind: int):
    """The argument types of ``_merge_splits``, for ``compile_ptx``."""
    from numba import types

    st = _storage_type(out_kind)
    return (types.float32[:, :, ::1], types.float32[:, ::1], st[:, ::1], st[::1])


def write_signature(cache_kind: int, key_kind: int, value_kind: int, strided: bool = False):
    """The argument types of ``_write_entries``, for ``compile_ptx`` (the new entries may be any
    strided device arrays)."""
    from numba import types

    kt, vt, ct = _storage_type(key_kind), _storage_type(value_kind), _storage_type(cache_kind)
    return (
        kt[:, :, :, :] if strided else kt[:, :, :, ::1],
        vt[:, :, :, :] if strided else vt[:, :, :, ::1],
        ct[:, :, :, ::1],
        ct[:, :, :, ::1],
        types.int32[:, ::1],
        types.int64[::1],
    )
