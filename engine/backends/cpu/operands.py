"""How the ``cpu`` backend's ops hand arrays to the kernels: (batch, heads, rows, features) layouts,
mask slots, 16-bit widening and rounding, the dropout argument and the mask_mod's tile map."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np

from ...kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE, TILE_FULL
from ...kernels.philox import dropout_threshold, split_seed
from ...problems.attention import AttentionProblem
from ...problems.masks import kernel_mask

__all__ = [
    "ALL_FULL",
    "NO_PIN",
    "NO_SOURCES",
    "SIXTEEN_BIT",
    "all_finite16",
    "amx_fits",
    "amx_operands",
    "amx_rows",
    "as4",
    "dropout_args",
    "kernel_masks",
    "narrow",
    "pad_head_widths",
    "tile_kinds",
    "widen",
]


_NO_DROPOUT = (np.uint64(0), 1.0, np.uint64(0), np.uint64(0))


def dropout_args(problem: AttentionProblem) -> tuple:
    """The kernels' ``dropout`` argument: (threshold, 1 / (1 - p), seed_lo, seed_hi), typed so
    that one compiled signature serves every call (``(0, 1.0, 0, 0)`` without dropout)."""
    if problem.dropout_p == 0:
        return _NO_DROPOUT
    lo, hi = split_seed(problem.dropout_seed)
    keep = 0.0 if problem.dropout_p == 1 else 1.0 / (1.0 - problem.dropout_p)
    return (np.uint64(dropout_threshold(problem.dropout_p)), keep, np.uint64(lo), np.uint64(hi))


#: the tile map of a call without mask_mod: every tile full
ALL_FULL = np.full((1, 1, 1, 1), TILE_FULL, dtype=np.int8)


NO_PIN = contextlib.nullcontext()


_dummies: dict = {}


def _dummy_masks(dtype: np.dtype):
    """(float mask, bool mask) placeholders for the kernel's unused mask slots, one pair per dtype:
    read-only and not contiguous, so they have the Numba type of a real broadcast mask (one
    compiled signature); the kernel never reads them."""
    pair = _dummies.get(dtype)
    if pair is None:
        pair = _dummies[dtype] = (
            np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dtype), (1, 1, 1, 2)),
            np.broadcast_to(np.ones((1, 1, 1, 1), dtype=np.bool_), (1, 1, 1, 2)),
        )
    return pair


def kernel_masks(problem: AttentionProblem):
    """``(fmask, bmask, mask_batch, kind)`` for the kernels. Both mask slots are always filled (a
    dummy the kernel never reads for the unused one), so a kernel compiles once per dtype instead
    of once per mask kind."""
    fmask, bmask = _dummy_masks(problem.dtype)
    mask_batch = np.zeros(problem.batch, dtype=np.int64)
    kind = MASK_NONE
    if problem.attn_mask is not None:
        mask, mask_batch = kernel_mask(problem)
        mask_batch = np.array(mask_batch, dtype=np.int64)  # writable: same signature as above
        if problem.mask_kind == "bool":
            bmask, kind = mask, MASK_BOOL
        else:
            fmask, kind = mask, MASK_FLOAT
    return fmask, bmask, mask_batch, kind


def widen(a: np.ndarray) -> np.ndarray:
    """float32 copy of a C-contiguous float16/bfloat16 array (exact; vectorised, unlike NumPy's
    float16 cast)."""
    from ...kernels.cpu.half import widen

    out = np.empty(a.shape, dtype=np.float32)
    widen(a.reshape(-1).view(np.uint16), out.reshape(-1), a.dtype == np.float16)
    return out


def all_finite16(a: np.ndarray) -> bool:
    """Whether the C-contiguous float16/bfloat16 array ``a`` holds no NaN or infinity (on its
    bits: no conversion)."""
    from ...kernels.cpu.half import all_finite_bits

    return bool(all_finite_bits(a.reshape(-1).view(np.uint16), a.dtype == np.float16))


def _aligned_empty(shape, dtype) -> np.ndarray:
    """``np.empty`` whose data starts a 64-byte cache line."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + 64, dtype=np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off : off + n].view(dtype).reshape(shape)


#: the forward kernel's AMX buffers when it has none (``amx_operands``)
NO_SOURCES = (np.empty((0, 0, 0, 0), np.uint16), np.empty((0, 0, 0, 0), np.uint16))


def amx_operands(k: np.ndarray, v: np.ndarray) -> tuple:
    """``(k_amx, vt_amx)``: the buffers the forward kernel's driver fills for the AMX path before
    its tasks (``kernels.cpu.amx.operands_head``), from C-contiguous (batch, heads, rows, features)
    16-bit bits, both with the keys rounded up to a multiple of 32 (``amx_rows``; the extra keys
    zero, so a last key tile's products run at the tile products' sizes): a copy of k, 64-byte
    aligned, where k's data does not start a cache line (AMX tile loads of rows straddling cache
    lines ran 6x slower on the Intel Xeon measured) or S is not a multiple of 32 (empty where k is
    read as it is), and the values' transpose, (batch, heads, features, rows), 64-byte aligned."""
    S = k.shape[2]
    rows = amx_rows(S)
    vt = _aligned_empty(v.shape[:2] + (v.shape[3], rows), v.dtype)
    aligned = k.ctypes.data % 64 == 0 and rows == S
    k_amx = NO_SOURCES[0] if aligned else _aligned_empty(k.shape[:2] + (rows, k.shape[3]), k.dtype)
    return k_amx, vt


def amx_rows(n: int) -> int:
    """``n`` rounded up to a multiple of 32 (``kernels.cpu.amx.AMX_BLOCK``)."""
    return -(-n // 32) * 32


def pad_head_widths(problem: AttentionProblem, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple:
    """``(problem, q, k, v)`` with the head widths E and Ev zero-padded to multiples of 32 for the
    16-bit tile products (``amx_fits``): zero features add nothing to a score, and the output's
    extra columns (zeros) are cut by the caller. ``q``, ``k`` (uint16 bits) and ``v`` are
    (batch, heads, rows, features); a copy of each, O(L * E) next to the O(L * S) kernel. The
    problem keeps its scale (1 / sqrt of the true E unless given)."""
    E, Ev = amx_rows(problem.E), amx_rows(problem.Ev)
    padded = []
    for a, width in ((q, E), (k, E), (v, Ev)):
        p = np.zeros(a.shape[:3] + (width,), a.dtype)
        p[..., : a.shape[3]] = a
        padded.append(p)
    q, k, v = padded
    dt = problem.dtype
    wider = dataclasses.replace(problem, query=q.view(dt), key=k.view(dt), value=v, E=E, Ev=Ev)
    return wider, q, k, v


def amx_fits(problem: AttentionProblem, block_q: int, block_k: int) -> bool:
    """Whether the AMX path takes ``problem`` at these tiles: the head widths and the tiles
    multiples of 32 (``kernels.cpu.amx.AMX_BLOCK``; any L and S: the kernel pads a partial tile's
    products), no dropout (its multipliers are applied to float32 probabilities)."""
    sizes = (problem.E, problem.Ev, block_q, block_k)
    return problem.dropout_p == 0 and problem.L > 0 and problem.S > 0 and all(n % 32 == 0 and n > 0 for n in sizes)


def narrow(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 ``x`` rounded to the 16-bit ``dtype`` (nearest even, as NumPy/ml_dtypes)."""
    from ...kernels.cpu.half import narrow

    x = np.ascontiguousarray(x)
    bits = np.empty(x.shape, dtype=np.uint16)
    narrow(x.reshape(-1), bits.reshape(-1), dtype == np.float16)
    return bits.view(dtype)


def as4(a, batch: int) -> np.ndarray:
    """C-contiguous (batch, heads, rows, features) view, or copy, of a host array."""
    a = np.ascontiguousarray(a)
    if a.ndim == 2:  # (L, E): one head, no batch
        return a.reshape((1, 1) + a.shape)
    return a.reshape((batch,) + a.shape[-3:])


#: 16-bit dtypes: computed in float32 (inputs widened once, O(L) next to the O(L^2) kernel), the
#: output and lse rounded to the input dtype once, as the ``reference`` backend does
SIXTEEN_BIT = ("float16", "bfloat16")


def tile_kinds(problem: AttentionProblem, block_q: int, block_k: int) -> np.ndarray:
    """The mask_mod's tile map at the kernel's tile sizes (from the caller's block mask when
    it has them, memoised there; otherwise built for this call)."""
    from ...problems.mods import create_block_mask

    bm = problem.block_mask
    if bm is None:
        bm = create_block_mask(
            problem.mask_mod,
            problem.batch,
            problem.num_q_heads,
            problem.L,
            problem.S,
            mod_args=problem.mod_args,
            block_q=block_q,
            block_k=block_k,
        )
    return bm.kinds_at(block_q, block_k)
