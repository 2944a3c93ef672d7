"""Tile products on Intel AMX (Advanced Matrix Extensions) for the 16-bit forward kernel.

AMX multiplies 16 x 32 blocks of bfloat16 (``TDPBF16PS``) or float16 (``TDPFP16PS``, AMX-FP16)
by 32 x 16 blocks into 16 x 16 float32 accumulators held in eight tile registers of 1 KiB. The
right operand comes in the "VNNI" layout: its rows taken in pairs, the two entries of each column
side by side, so a row of the B tile is 16 pairs = 16 uint32 (Intel 64 and IA-32 Architectures
Software Developer's Manual, vol. 1, ch. 18 "Intel AMX"; the LLVM intrinsics ``llvm.x86.tileloadd64``,
``llvm.x86.tdpbf16ps`` and the like, which take their tile numbers as immediates).

:func:`amx_gemm` computes ``C (M x N, float32) = or += A (M x K, 16-bit, rows contiguous) @ B``
with B given in the pair layout (K / 2 rows of N uint32), M, N, K multiples of 32, from raw
addresses and row strides in bytes: each 32 x 32 block of C is four accumulator tiles, fed by
two A tiles and two B tiles per 32 columns of K (2 x 2 register blocking, eight tiles). The
forward kernel arranges both of its products in this form (``flash_fwd``): the transposed scores
``K @ Q.T`` with K's rows as A and Q's rows paired into B once per task, and the transposed output
``V.T @ P.T`` with V transposed once per call and the probabilities written paired by the softmax
pass. Nothing is packed per tile, which is where MKL's 16-bit GEMM spent a fifth of its time.

Linux hands a process the AMX tile state only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); :func:`amx_ready` asks once and says whether the CPU (as LLVM sees it, so
also as the JIT compiles) and the kernel allow AMX for a dtype.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...runtime.jit_cache import cache_enabled
from .vector_width import target_features as _cpu_features

_CACHE = cache_enabled()

__all__ = ["amx_ready", "amx_gemm", "amx_call", "amx_release", "operands_head", "AMX_BLOCK"]

#: M, N and K of :func:`amx_gemm` are multiples of this
AMX_BLOCK = 32

_I8, _I16, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
_PTR = ir.IntType(8).as_pointer()

#: arch_prctl's request for an extended state component, and the component of the tile data
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def _os_grants_amx() -> bool:
    """Whether Linux lets this process use the AMX tile data (asked once per process; MKL and
    oneDNN ask the same way, so the answer is shared)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def amx_ready(dtype_name: str) -> bool:
    """Whether :func:`amx_gemm` can run for ``dtype_name`` (``bfloat16``: AMX-BF16; ``float16``:
    AMX-FP16) in this process: the CPU Numba compiles for has the extension (the host CPU as LLVM
    detects it, or ``NUMBA_CPU_FEATURES`` where set; a ``NUMBA_CPU_NAME`` without features, as for
    portable caches, counts as none), Linux grants the tile state, and ``ATTENTION_ENGINE_AMX`` is
    not ``0``/``off``/``false``/``no``."""
    if os.environ.get("ATTENTION_ENGINE_AMX", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    need = {"bfloat16": "amx-bf16", "float16": "amx-fp16"}.get(dtype_name)
    return need is not None and need in _cpu_features() and "amx-tile" in _cpu_features() and _os_grants_amx()


def _declare(builder, name, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), args), name)


def _literal_ints(*tys):
    return all(isinstance(t, types.IntegerLiteral) for t in tys)


@intrinsic
def _tile_config(typingctx):
    """ldtilecfg: palette 1, all eight tiles 16 rows x 64 bytes (the 64-byte config on the stack)."""

    def codegen(context, builder, sig, args):
        cfg = cgutils.alloca_once(builder, ir.ArrayType(_I8, 64))
        builder.store(ir.Constant(ir.ArrayType(_I8, 64), None), cfg)  # zeroes (reserved bytes must be)
        base = builder.bitcast(cfg, _PTR)
        builder.store(ir.Constant(_I8, 1), base)
        for t in range(8):
            colsb = builder.bitcast(builder.gep(base, [ir.Constant(_I64, 16 + 2 * t)]), _I16.as_pointer())
            builder.store(ir.Constant(_I16, 64), colsb)
            builder.store(ir.Constant(_I8, 16), builder.gep(base, [ir.Constant(_I64, 48 + t)]))
        builder.call(_declare(builder, "llvm.x86.ldtilecfg", [_PTR]), [base])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _tile_release(typingctx):
    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _tile_zero(typingctx, t):
    if not _literal_ints(t):
        return None
    n = t.literal_value

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilezero", [_I8]), [ir.Constant(_I8, n)])
        return context.get_dummy_value()

    return types.none(t), codegen


def _tile_move(name):
    @intrinsic
    def move(typingctx, t, addr, stride):
        if not _literal_ints(t):
            return None
        n = t.literal_value

        def codegen(context, builder, sig, args):
            ptr = builder.inttoptr(args[1], _PTR)
            builder.call(_declare(builder, name, [_I8, _PTR, _I64]), [ir.Constant(_I8, n), ptr, args[2]])
            return context.get_dummy_value()

        return types.none(t, types.int64, types.int64), codegen

    return move


#: tile t <- the 16 rows of 64 bytes at addr, stride bytes apart; and back
_tile_load = _tile_move("llvm.x86.tileloadd64")
_tile_store = _tile_move("llvm.x86.tilestored64")


@intrinsic
def _tile_product(typingctx, fp16, c, a, b):
    """tile c += tile a @ tile b (b in the pair layout): ``TDPFP16PS`` where the literal ``fp16``
    is True, else ``TDPBF16PS`` (only the one named is emitted: the other may not exist here)."""
    if not (isinstance(fp16, types.BooleanLiteral) and _literal_ints(c, a, b)):
        return None
    name = "llvm.x86.tdpfp16ps" if fp16.literal_value else "llvm.x86.tdpbf16ps"
    ns = [ir.Constant(_I8, t.literal_value) for t in (c, a, b)]

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, name, [_I8, _I8, _I8]), ns)
        return context.get_dummy_value()

    return types.none(fp16, c, a, b), codegen


@njit(inline="always")
def _tile_gemm(a, lda, b, ldb, c, ldc, M, N, K, accumulate, fp16):
    """The body of :func:`amx_gemm`; ``fp16`` a literal (which instruction is emitted). M = 0:
    release the tiles (``TILERELEASE``) and nothing else."""
    if M == 0:
        _tile_release()
        return
    _tile_config()
    for m0 in range(0, M, 32):
        for n0 in range(0, N, 32):
            c0 = c + m0 * ldc + n0 * 4
            c1 = c0 + 16 * ldc
            if accumulate:
                _tile_load(0, c0, ldc)
                _tile_load(1, c0 + 64, ldc)
                _tile_load(2, c1, ldc)
                _tile_load(3, c1 + 64, ldc)
            else:
                _tile_zero(0)
                _tile_zero(1)
                _tile_zero(2)
                _tile_zero(3)
            for k0 in range(0, K, 32):
                a0 = a + m0 * lda + k0 * 2
                b0 = b + (k0 // 2) * ldb + n0 * 4
                _tile_load(4, a0, lda)
                _tile_load(5, a0 + 16 * lda, lda)
                _tile_load(6, b0, ldb)
                _tile_load(7, b0 + 64, ldb)
                _tile_product(fp16, 0, 4, 6)
                _tile_product(fp16, 1, 4, 7)
                _tile_product(fp16, 2, 5, 6)
                _tile_product(fp16, 3, 5, 7)
            _tile_store(0, c0, ldc)
            _tile_store(1, c0 + 64, ldc)
            _tile_store(2, c1, ldc)
            _tile_store(3, c1 + 64, ldc)


def _gemm_bf16(a, lda, b, ldb, c, ldc, M, N, K, accumulate):
    _tile_gemm(a, lda, b, ldb, c, ldc, M, N, K, accumulate, False)


def _gemm_f16(a, lda, b, ldb, c, ldc, M, N, K, accumulate):
    _tile_gemm(a, lda, b, ldb, c, ldc, M, N, K, accumulate, True)


_SIGNATURE = types.void(*(types.int64,) * 10)
_BODIES = {"bfloat16": _gemm_bf16, "float16": _gemm_f16}


def amx_gemm(dtype_name: str) -> int:
    """The address of a C function ``gemm(a, lda, b, ldb, c, ldc, M, N, K, accumulate)`` (all
    int64, returning nothing) computing ``C = A @ B`` (``accumulate``: ``C += A @ B``) on AMX
    tiles for ``dtype_name`` operands (``bfloat16`` or ``float16``), or 0 where
    :func:`amx_ready` says no. Addresses and row strides in bytes: A (M x K) 16-bit, rows of K
    contiguous entries; B (K x N) in the pair layout, K / 2 rows of N uint32 (entries (2i, j) and
    (2i + 1, j) of B in the low and high half of row i's j-th); C (M x N) float32, row-major.
    M, N and K multiples of :data:`AMX_BLOCK`; products summed in float32 by the hardware. The
    tiles stay configured after a product; ``M = 0`` releases them (``TILERELEASE``): a caller
    does so when it is done (``amx_release``), so that its thread does not carry 8 KiB of tile
    state through context switches.

    Compiled here, apart from the kernels, only on a CPU with the extension (LLVM cannot emit an
    AMX instruction for a CPU without it), and called by address (:func:`amx_call`), so the
    kernels compile and cache the same on every CPU. The caller keeps the arrays alive."""
    return _compiled(dtype_name) if amx_ready(dtype_name) else 0


@functools.cache
def _compiled(dtype_name: str) -> int:
    from numba import cfunc

    return cfunc(_SIGNATURE, cache=_CACHE)(_BODIES[dtype_name]).address


@intrinsic
def amx_call(typingctx, fn, a, lda, b, ldb, c, ldc, M, N, K, accumulate):
    """``fn(a, lda, b, ldb, c, ldc, M, N, K, accumulate)`` for an address from :func:`amx_gemm`
    (every argument an integer, passed as int64)."""
    rest = (a, lda, b, ldb, c, ldc, M, N, K, accumulate)
    if not all(isinstance(t, (types.Integer, types.Boolean)) for t in (fn,) + rest):
        return None
    sig = types.void(fn, *rest)

    def codegen(context, builder, signature, args):
        f = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [_I64] * 10).as_pointer())
        vals = []
        for ty, v in zip(signature.args[1:], args[1:]):
            vals.append(context.cast(builder, v, ty, types.int64))
        builder.call(f, vals)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def operands_head(k_src, v_src, k_out, vt_out, bh):
    """The AMX path's operands of head ``bh`` (batch * heads + head), made by the forward kernel's
    driver in its own parallel loop before the tasks (a second parallel region from Python, with
    a gap between, made calls 5x slower for a while after an idle pause on the KVM guest
    measured): ``vt_out[b, h] = v_src[b, h].T`` for 16-bit bits, (B, H, S, E) ``v_src`` and
    C-contiguous (B, H, E, Sp) ``vt_out``, its columns from S to Sp (even) zero; ``k_src[b, h]``
    copied into the first S rows of ``k_out[b, h]`` (B, H, Sp, E) and its other rows zeroed,
    unless ``k_out`` is empty (a k whose rows start cache lines is read as it is). Two rows of
    ``v`` at a time as one uint32 per column, written 16 at a time: 6x faster than element by
    element (0.12 against 0.72 ms for 8 x 1024 x 64 on one thread, Intel Xeon)."""
    B, H, S, E = v_src.shape
    Sp = vt_out.shape[3]
    b = bh // H
    h = bh - b * H
    half = S // 2
    full = half // 16 * 16
    sixteen = np.uint32(16)
    x = v_src[b, h]
    y = vt_out[b, h].reshape(E * Sp).view(np.uint32).reshape((E, Sp // 2))
    for p0 in range(0, full, 16):
        for e in range(E):
            for p in range(p0, p0 + 16):  # a constant count: unrolled and vectorised
                y[e, p] = np.uint32(x[2 * p, e]) | (np.uint32(x[2 * p + 1, e]) << sixteen)
    for e in range(E):
        for p in range(full, half):
            y[e, p] = np.uint32(x[2 * p, e]) | (np.uint32(x[2 * p + 1, e]) << sixteen)
        if S % 2:  # the last key paired with a zero one
            y[e, half] = np.uint32(x[S - 1, e])
        for p in range((S + 1) // 2, Sp // 2):
            y[e, p] = 0
    if k_out.size > 0:  # flat: a vectorised copy (an element loop over the 2-D slices ran at 6 GB/s)
        n = S * k_src.shape[3]
        src = k_src[b, h].reshape(n)
        dst = k_out[b, h].reshape(k_out.shape[2] * k_out.shape[3])
        for i in range(n):
            dst[i] = src[i]
        for i in range(n, dst.shape[0]):
            dst[i] = 0


@njit(inline="always")
def amx_release(fn):
    """Release the AMX tiles of this thread through ``fn`` (an address from :func:`amx_gemm`)."""
    amx_call(fn, 0, 0, 0, 0, 0, 0, 0, 0, 0, False)
