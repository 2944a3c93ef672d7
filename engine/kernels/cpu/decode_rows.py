"""The decode step's two passes over one query row's cache rows with the row's vectors in registers
(``engine.kernels.cpu.decode_gemv``, one query row per cache head, float32, head widths of 16 to
128 in steps of 16 with AVX-512, to 64 without).

Numba's loops over a row of the head dimension keep the query (key pass) or the accumulator
(value pass) in memory: the value pass loaded and stored its accumulator for every value row, a
chain of store-to-load forwards, and the key pass reloaded the query for every key. Here both
live in vector registers across the tile, as a matrix-vector kernel keeps them (ONNX Runtime's
GEMV for M = 1; FlashDecoding's one-row case): per key, one row of the head dimension is loaded
once, in address order, and multiplied into registers. The code is LLVM vector IR (``<16 x
float>`` per 64 bytes, which LLVM splits into two 256-bit registers on a CPU without AVX-512),
built by :func:`_dots` and :func:`_weighted_sum` for a head width known when the task compiles.
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .ir_loop import counted_loop
from .vector_width import target_features

__all__ = ["row_scores", "row_values"]

_I32, _I64 = ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_V16 = ir.VectorType(_F32, 16)
#: the shuffle mask that copies lane 0 to all 16
_BROADCAST = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
#: the widest head this keeps in registers: 8 vectors of 16 (32 zmm registers on AVX-512)
MAX_CHUNKS = 8
#: the widest head taken on this target: 128 with AVX-512's 32 registers, 64 with AVX2's 16 ymm
#: (a head of 128 is 16 ymm accumulators: they would spill). A constant of the compiled task:
#: Numba's disk cache is keyed by the CPU it compiled for
WIDEST = 128 if "avx512f" in target_features() else 64


def _vector_at(builder, address, offset):
    return builder.inttoptr(builder.add(address, ir.Constant(_I64, offset)), _V16.as_pointer())


def _load(builder, address, offset):
    """The 16 float32 at ``address + offset`` (bytes; any alignment)."""
    return builder.load(_vector_at(builder, address, offset), align=4)


def _typed(ints, chunks):
    """``(signature, chunk count)`` of a call with the integer arguments ``ints`` (addresses,
    strides, counts; passed as int64) and a literal ``chunks`` from 1 to ``MAX_CHUNKS``; None for
    any other call (Numba then reports no matching signature)."""
    if not (all(isinstance(t, types.Integer) for t in ints) and isinstance(chunks, types.IntegerLiteral)):
        return None
    count = chunks.literal_value
    if not 1 <= count <= MAX_CHUNKS:
        return None
    return types.void(*(types.int64,) * len(ints), chunks), count


@intrinsic
def _dots(typingctx, q, rows, stride, n, out, chunks):
    """``out[j] = sum(q[0:16 * chunks] * row_j)`` for j < n, row_j at ``rows + j * stride``
    (addresses and the stride in bytes, float32). ``chunks`` a literal from 1 to ``MAX_CHUNKS``."""
    typed = _typed((q, rows, stride, n, out), chunks)
    if typed is None:
        return None
    sig, count = typed

    def codegen(context, builder, signature, args):
        q, rows, stride, n, out = args[:5]
        qv = [_load(builder, q, 64 * c) for c in range(count)]
        reduce = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F32, [_F32, _V16]), "llvm.vector.reduce.fadd.v16f32"
        )

        def body(j, carried):
            row = builder.add(rows, builder.mul(j, stride))
            total = builder.fmul(qv[0], _load(builder, row, 0))
            for c in range(1, count):
                total = builder.fadd(total, builder.fmul(qv[c], _load(builder, row, 64 * c)))
            # reassoc: a tree of adds, not a chain of sixteen
            s = builder.call(reduce, [ir.Constant(_F32, -0.0), total], fastmath=("reassoc",))
            at = builder.inttoptr(builder.add(out, builder.mul(j, ir.Constant(_I64, 4))), _F32.as_pointer())
            builder.store(s, at, align=4)
            return []

        counted_loop(builder, n, [], body)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _weighted_sum(typingctx, acc, weights, rows, stride, n, chunks):
    """``acc[0:16 * chunks] += w_j * row_j`` for j < n where ``w_j = weights[j]`` is not 0 (a row
    of weight 0 is read but not added: its NaN or inf must not reach the sum), row_j at ``rows +
    j * stride`` (addresses and the stride in bytes, float32); the accumulator stays in registers
    from the first row to the last. ``chunks`` a literal from 1 to ``MAX_CHUNKS``."""
    typed = _typed((acc, weights, rows, stride, n), chunks)
    if typed is None:
        return None
    sig, count = typed

    def codegen(context, builder, signature, args):
        acc, weights, rows, stride, n = args[:5]
        start = [_load(builder, acc, 64 * c) for c in range(count)]
        zero = ir.Constant(_F32, 0.0)

        def body(j, sums):
            at = builder.inttoptr(builder.add(weights, builder.mul(j, ir.Constant(_I64, 4))), _F32.as_pointer())
            w = builder.load(at, align=4)
            weighed = builder.fcmp_unordered("!=", w, zero)  # (a NaN weight weighs: NaN)
            splat = builder.insert_element(ir.Constant(_V16, None), w, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(splat, ir.Constant(_V16, None), _BROADCAST)
            row = builder.add(rows, builder.mul(j, stride))
            new = []
            for c in range(count):
                added = builder.fadd(sums[c], builder.fmul(splat, _load(builder, row, 64 * c)))
                new.append(builder.select(weighed, added, sums[c]))
            return new

        for c, v in enumerate(counted_loop(builder, n, start, body)):
            builder.store(v, _vector_at(builder, acc, 64 * c), align=4)
        return context.get_dummy_value()

    return sig, codegen


def row_scores(qt, keys, j0, nk, sc, D):
    """``sc[0, c] = qt[0] . keys[j0 + c]`` for c < nk, in registers; False (nothing done) where
    this module does not take the case (not float32 and C-contiguous, or D not 16 to ``WIDEST`` by 16)."""


def row_values(ac, sc, values, j0, nk, Dv):
    """``ac[0] += sum over c < nk of sc[0, c] * values[j0 + c]`` (rows of weight 0 left out), in
    registers; False (nothing done) where this module does not take the case."""


def _dispatch(kernel):
    """Numba code calling ``kernel`` with the literal chunk count of the width ``n`` (16 to
    ``WIDEST`` in steps of 16), or returning False."""

    @njit(inline="always")
    def call(a, b, c, d, e, n):
        if n > WIDEST:
            return False
        if n == 64:
            kernel(a, b, c, d, e, 4)
        elif n == 128:
            kernel(a, b, c, d, e, 8)
        elif n == 32:
            kernel(a, b, c, d, e, 2)
        elif n == 16:
            kernel(a, b, c, d, e, 1)
        elif n == 48:
            kernel(a, b, c, d, e, 3)
        elif n == 80:
            kernel(a, b, c, d, e, 5)
        elif n == 96:
            kernel(a, b, c, d, e, 6)
        elif n == 112:
            kernel(a, b, c, d, e, 7)
        else:
            return False
        return True

    return call


_scores_call = _dispatch(_dots)
_values_call = _dispatch(_weighted_sum)


def _float32_rows(*arrays):
    return all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in arrays)


@overload(row_scores, inline="always")
def _row_scores_impl(qt, keys, j0, nk, sc, D):
    if not _float32_rows(qt, keys, sc):
        return lambda qt, keys, j0, nk, sc, D: False

    def impl(qt, keys, j0, nk, sc, D):
        rows = keys.ctypes.data + j0 * keys.strides[0]
        return _scores_call(qt.ctypes.data, rows, keys.strides[0], nk, sc.ctypes.data, D)

    return impl


@overload(row_values, inline="always")
def _row_values_impl(ac, sc, values, j0, nk, Dv):
    if not _float32_rows(ac, sc, values):
        return lambda ac, sc, values, j0, nk, Dv: False

    def impl(ac, sc, values, j0, nk, Dv):
        rows = values.ctypes.data + j0 * values.strides[0]
        return _values_call(ac.ctypes.data, sc.ctypes.data, rows, values.strides[0], nk, Dv)

    return impl
