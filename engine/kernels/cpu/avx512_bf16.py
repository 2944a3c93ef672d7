"""Tile products on AVX512-BF16 (``VDPBF16PS``) for the bfloat16 forward kernel on CPUs without AMX.

``VDPBF16PS`` multiplies the 16 pairs of bfloat16 in two 512-bit registers and adds each pair's
two products to one float32 lane of an accumulator (Intel 64 and IA-32 Architectures Software
Developer's Manual, vol. 2, "VDPBF16PS"; LLVM's ``llvm.x86.avx512bf16.dpbf16ps.512``): AMD Zen 4
and Intel Cooper Lake have it. Its right operand is AMX's pair layout (``engine.kernels.cpu.amx``),
so :func:`bf16_dot_gemm` takes the very operands ``amx_gemm`` takes and the forward kernel runs
its AMX path unchanged with this product in place of the tile one: each 8 x 32 block of C is
sixteen accumulator registers (eight rows of A, two registers of 16 columns), fed per pair of K by
two loads of B's pair row and one broadcast of two bfloat16 of A per row. On AMD Zen 4 (one
thread) a 256 x 256 x 64 product ran at 197 GFLOP/s against 96 for NumPy's float32 GEMM and MKL's
bfloat16 one (which does not reach the instruction's rate there).

Like AMX's, the instruction treats bfloat16 subnormal inputs as zero and rounds its float32
results to nearest even with subnormal results flushed to zero: products of normal bfloat16 are
exact in float32 and their sums are rounded as float32 sums are.
"""

from __future__ import annotations

import functools
import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ...runtime.jit_cache import cache_enabled
from .ir_loop import counted_loop
from .vector_width import target_features

_CACHE = cache_enabled()

__all__ = ["bf16_dot_ready", "bf16_dot_gemm"]

_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16F = ir.VectorType(ir.FloatType(), 16)
_V16I = ir.VectorType(_I32, 16)
#: rows of A and 16-column registers of C per block (2 x 8 accumulators + 2 of B + 1 of A: 19 of
#: the 32 zmm registers)
_ROWS, _REGS = 8, 2


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` type, which llvmlite's IR classes lack (the IR is text: its name is
    enough)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_V32BF = ir.VectorType(_BFloat(), 32)


@intrinsic
def _block(typingctx, a, lda, b, ldb, c, ldc, K, accumulate):
    """C[0:8, 0:32] = (or += where ``accumulate``) A[0:8, 0:K] @ B[0:K, 0:32]: addresses and row
    strides in bytes, A's rows bfloat16, B in the pair layout (K / 2 rows of 32 uint32), C
    float32; K even. The accumulators stay in registers across K."""
    ints = (a, lda, b, ldb, c, ldc, K)
    if not all(isinstance(t, types.Integer) for t in ints) or not isinstance(accumulate, types.Boolean):
        return None
    sig = types.void(*(types.int64,) * 7, types.boolean)

    def codegen(context, builder, signature, args):
        a, lda, b, ldb, c, ldc, K, add = args
        dot = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]), "llvm.x86.avx512bf16.dpbf16ps.512"
        )

        def c_ptr(r, j):
            at = builder.add(builder.add(c, builder.mul(ir.Constant(_I64, r), ldc)), ir.Constant(_I64, 64 * j))
            return builder.inttoptr(at, _V16F.as_pointer())

        n = _ROWS * _REGS
        with builder.if_else(add) as (then, otherwise):
            with then:
                loaded = [builder.load(c_ptr(r, j), align=4) for r in range(_ROWS) for j in range(_REGS)]
                from_load = builder.block
            with otherwise:
                from_zero = builder.block
        start = []
        for i in range(n):
            phi = builder.phi(_V16F)
            phi.add_incoming(loaded[i], from_load)
            phi.add_incoming(ir.Constant(_V16F, None), from_zero)
            start.append(phi)
        pairs = builder.sdiv(K, ir.Constant(_I64, 2))

        def pair_step(p, acc):  # one pair of k: B's pair row into registers, a VDPBF16PS each
            row = builder.add(b, builder.mul(p, ldb))
            bv = [
                builder.bitcast(
                    builder.load(
                        builder.inttoptr(builder.add(row, ir.Constant(_I64, 64 * j)), _V16I.as_pointer()), align=4
                    ),
                    _V32BF,
                )
                for j in range(_REGS)
            ]
            offset = builder.mul(p, ir.Constant(_I64, 4))  # two bfloat16 of A's row per pair
            new = []
            for r in range(_ROWS):
                at = builder.add(builder.add(a, builder.mul(ir.Constant(_I64, r), lda)), offset)
                two = builder.load(builder.inttoptr(at, _I32.as_pointer()), align=2)
                splat = builder.insert_element(ir.Constant(_V16I, None), two, ir.Constant(_I32, 0))
                splat = builder.shuffle_vector(splat, ir.Constant(_V16I, None), ir.Constant(_V16I, [0] * 16))
                av = builder.bitcast(splat, _V32BF)
                for j in range(_REGS):
                    new.append(builder.call(dot, [acc[r * _REGS + j], av, bv[j]]))
            return new

        outs = counted_loop(builder, pairs, start, pair_step)
        for i, out in enumerate(outs):
            builder.store(out, c_ptr(i // _REGS, i % _REGS), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _gemm(a, lda, b, ldb, c, ldc, M, N, K, accumulate):
    for m0 in range(0, M, _ROWS):  # M = 0 (amx_release's call): nothing to release here
        for n0 in range(0, N, 16 * _REGS):
            _block(a + m0 * lda, lda, b + n0 * 4, ldb, c + m0 * ldc + n0 * 4, ldc, K, accumulate != 0)


_SIGNATURE = types.void(*(types.int64,) * 10)


def bf16_dot_ready() -> bool:
    """Whether :func:`bf16_dot_gemm` can run here: the CPU Numba compiles for has AVX512-BF16 (as
    ``amx_ready`` reads it) and ``ATTENTION_ENGINE_AVX512_BF16`` is not ``0``/``off``/``false``/``no``
    (as ``ATTENTION_ENGINE_AUTOTUNE``)."""
    if os.environ.get("ATTENTION_ENGINE_AVX512_BF16", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    return "avx512bf16" in target_features()


def bf16_dot_gemm(dtype_name: str) -> int:
    """The address of a C function with ``engine.kernels.cpu.amx.amx_gemm``'s contract (``gemm(a,
    lda, b, ldb, c, ldc, M, N, K, accumulate)``, all int64: C (M x N, float32) = or += A (M x K,
    rows contiguous) @ B (K x N in the pair layout), M, N, K multiples of 32; ``M = 0`` does
    nothing) computing on ``VDPBF16PS``, for ``bfloat16`` operands where :func:`bf16_dot_ready`;
    else 0. Compiled apart from the kernels (LLVM cannot emit the instruction for a CPU without it)
    and called by address, as ``amx_gemm`` is."""
    return _compiled() if dtype_name == "bfloat16" and bf16_dot_ready() else 0


@functools.cache
def _compiled() -> int:
    from numba import cfunc

    return cfunc(_SIGNATURE, cache=_CACHE)(_gemm).address
