"""The engine's own float32/float64 tile product: a register-blocked GEMM on vector FMA, with
CBLAS's ``?gemm`` signature, for the ``fma`` GEMM provider (``engine.runtime.gemm_providers``).

The design is the GotoBLAS/BLIS one without the packing of A (K. Goto and R. van de Geijn,
"Anatomy of high-performance matrix multiplication", ACM TOMS 34(3), 2008; F. Van Zee and R. van
de Geijn, "BLIS: a framework for rapidly instantiating BLAS functionality", ACM TOMS 41(3), 2015):
C is computed in blocks of :data:`ROWS` rows by ``REGS`` vector registers of columns; each block's
accumulators stay in registers for the whole K loop, which per step loads ``REGS`` vectors of one
row of B and broadcasts one element of each of the block's rows of A into a fused multiply-add
(``llvm.fma``). A is read where it lies, row-major or transposed (the attention kernels' tiles are
a few hundred rows of at most a few hundred elements: they stay in the L2 cache). B is copied one
block of columns at a time into a panel of contiguous rows (zero-padded at the last, partial
block), which stays in L1 while the blocks of rows of A pass over it. The vector width follows
the CPU Numba compiles for (:func:`lanes`: 512-bit registers with AVX-512, else 256-bit), so one
source serves Zen 3 (AVX2), Zen 4 and Xeon (AVX-512).

Why it exists: at the attention kernels' tile shapes, where K is a head size (scores) or a key
tile (values), the libraries' GEMMs spend a tenth of their time packing both operands and clearing
C (``docs/performance.md``, "Where the forward's cycles go"). On AMD Zen 4, one thread
(``python bench/provider_tiles.py``): a 256 x 256 x 64 scores tile at 109 GFLOP/s against 96 for
``scipy-openblas32`` (SkylakeX kernels), a 256 x 64 x 256 values tile at 112 against 99; on
OpenBLAS's own small tiles (128 x 64 x 64) 106 against 115. Whether it is used is measured per
machine like every provider (``engine.backends.cpu.autotune``).

Results differ from a library's only by rounding: each output is one FMA chain over K, in order,
for K up to :data:`KC` (512), and a sum of such chains, one per slice of 512, beyond.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ...runtime.jit_cache import cache_enabled
from .ir_loop import counted_loop
from .vector_width import target_features

__all__ = ["lanes", "fma_ready", "fma_gemm", "ROWS", "REGS"]

_CACHE = cache_enabled()
_I32, _I64 = ir.IntType(32), ir.IntType(64)
#: rows of A per block, and vector registers of C's columns per row (24 accumulators, 4 of B and
#: 1 broadcast: 29 of AVX-512's 32 registers), where the CPU has AVX-512; with 256-bit registers
#: the classic 6 x 2 (12 + 2 + 1 of 16)
ROWS = 6
REGS = {512: 4, 256: 2}
#: rows of B (the inner dimension) per panel: the attention kernels' products fit one (a head
#: size, or a key tile of at most 512); longer ones are summed slice by slice into C, which
#: bounds the panel's memory and each FMA chain's length
KC = 512
#: CBLAS's enum values (cblas.h)
_ROW_MAJOR, _NO_TRANS = 101, 111


def _bits() -> int:
    """The vector register width the product is compiled for: 512 where the CPU Numba compiles
    for has AVX-512F, else 256."""
    return 512 if "avx512f" in target_features() else 256


def lanes(dtype_name: str) -> int:
    """Elements of ``dtype_name`` (float32 or float64) per vector register here."""
    return _bits() // (32 if dtype_name == "float32" else 64)


def fma_ready() -> bool:
    """Whether the CPU Numba compiles for has FMA (every x86 CPU since 2013-2015; without it the
    product would call ``fma`` from libm per element)."""
    return "fma" in target_features()


#: the vector width compiled for, in bits, and the columns of C per block by dtype
_BITS = _bits()
_REGS_HERE = REGS[_BITS]
_NC32, _NC64 = (_BITS // 32) * _REGS_HERE, (_BITS // 64) * _REGS_HERE


@intrinsic
def _block(typingctx, a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta, regs):
    """C[0:ROWS, 0:NC] = alpha * A @ B + beta * C (beta = 0: C is not read; NC = ``regs``
    vectors, ``regs`` a constant from 1 to :data:`REGS`), with A's element (r, k) at ``a + r *
    sa_r + k * sa_k``, B's rows of NC contiguous elements ``ldb`` bytes apart, C's rows ``ldc``
    bytes apart (addresses and strides in bytes). Rows of A at and after ``rows`` read row
    ``rows - 1`` and their C rows are not written."""
    ints = (a, sa_r, sa_k, b, ldb, c, ldc, K, rows)
    if not all(isinstance(t, types.Integer) for t in ints) or not isinstance(alpha, types.Float):
        return None
    if alpha != beta or not isinstance(regs, types.IntegerLiteral):
        return None
    sig = types.void(*(types.int64,) * 9, alpha, beta, regs)
    n_regs = regs.literal_value

    def codegen(context, builder, signature, args):
        a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta, _ = args
        fty = context.get_value_type(signature.args[9])
        isz = 4 if signature.args[9] == types.float32 else 8
        width, regs = _BITS // (8 * isz), n_regs
        vty = ir.VectorType(fty, width)
        suffix = f"v{width}f{isz * 8}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.{suffix}")
        zeros_i32 = ir.Constant(ir.VectorType(_I32, width), [0] * width)

        def splat(x):
            v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, ir.Constant(vty, None), zeros_i32)

        def vec_ptr(base, j):
            return builder.inttoptr(builder.add(base, ir.Constant(_I64, isz * width * j)), vty.as_pointer())

        last = builder.sub(rows, ir.Constant(_I64, 1))
        row_a = []
        for r in range(ROWS):
            rr = builder.select(builder.icmp_signed("<", ir.Constant(_I64, r), rows), ir.Constant(_I64, r), last)
            row_a.append(builder.add(a, builder.mul(rr, sa_r)))
        n = ROWS * regs

        def k_step(p, acc):  # one k: B's row of NC into registers, an FMA per accumulator
            brow = builder.add(b, builder.mul(p, ldb))
            bv = [builder.load(vec_ptr(brow, j), align=isz) for j in range(regs)]
            koff = builder.mul(p, sa_k)
            new = []
            for r in range(ROWS):
                x = builder.load(builder.inttoptr(builder.add(row_a[r], koff), fty.as_pointer()), align=isz)
                xs = splat(x)
                for j in range(regs):
                    new.append(builder.call(fma, [xs, bv[j], acc[r * regs + j]]))
            return new

        outs = counted_loop(builder, K, [ir.Constant(vty, None)] * n, k_step)
        va, vb = splat(alpha), splat(beta)
        read_c = builder.fcmp_unordered("!=", beta, ir.Constant(fty, 0.0))  # NaN beta reads C, as BLAS
        for r in range(ROWS):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, r), rows), likely=True):
                crow = builder.add(c, builder.mul(ir.Constant(_I64, r), ldc))
                for j in range(regs):
                    ptr = vec_ptr(crow, j)
                    val = builder.fmul(outs[r * regs + j], va)
                    with builder.if_else(read_c) as (then, otherwise):
                        with then:
                            with_c = builder.call(fma, [builder.load(ptr, align=isz), vb, val])
                            from_c = builder.block
                        with otherwise:
                            from_none = builder.block
                    got = builder.phi(vty)
                    got.add_incoming(with_c, from_c)
                    got.add_incoming(val, from_none)
                    builder.store(got, ptr, align=isz)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_row(typingctx, dst, src, like, regs):
    """Copy one row of a block of B (``regs`` vectors of ``like``'s type, a constant) from ``src``
    to ``dst`` (addresses; unaligned loads and stores)."""
    if not (isinstance(dst, types.Integer) and isinstance(src, types.Integer) and isinstance(like, types.Float)):
        return None
    if not isinstance(regs, types.IntegerLiteral):
        return None
    n_regs = regs.literal_value

    def codegen(context, builder, signature, args):
        isz = 4 if like == types.float32 else 8
        width = _BITS // (8 * isz)
        vty = ir.VectorType(context.get_value_type(like), width)
        for j in range(n_regs):
            off = ir.Constant(_I64, isz * width * j)
            x = builder.load(builder.inttoptr(builder.add(args[1], off), vty.as_pointer()), align=isz)
            builder.store(x, builder.inttoptr(builder.add(args[0], off), vty.as_pointer()), align=isz)
        return context.get_dummy_value()

    return types.void(dst, src, like, regs), codegen


@njit(inline="always")
def _block_of(nregs, a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta):
    """:func:`_block` with ``nregs`` (1 to 4) vectors of columns, chosen at run time."""
    if nregs == 1:
        _block(a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta, 1)
    elif nregs == 2:
        _block(a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta, 2)
    elif nregs == 3:
        _block(a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta, 3)
    else:
        _block(a, sa_r, sa_k, b, ldb, c, ldc, K, rows, alpha, beta, 4)


@njit(inline="always")
def _copy_row_of(nregs, dst, src, like):
    """:func:`_copy_row` of ``nregs`` (1 to 4) vectors, chosen at run time."""
    if nregs == 1:
        _copy_row(dst, src, like, 1)
    elif nregs == 2:
        _copy_row(dst, src, like, 2)
    elif nregs == 3:
        _copy_row(dst, src, like, 3)
    else:
        _copy_row(dst, src, like, 4)


@intrinsic
def _load(typingctx, address, like):
    """The element at ``address`` of ``like``'s type."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], context.get_value_type(like).as_pointer()))

    return like(address, like), codegen


@intrinsic
def _store(typingctx, address, value):
    """Write ``value`` (a float) at ``address``."""
    if not isinstance(address, types.Integer) or not isinstance(value, types.Float):
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], context.get_value_type(value).as_pointer()))
        return context.get_dummy_value()

    return types.void(address, value), codegen


@njit(inline="always")
def _gemm(dtype, isz, nc, layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """CBLAS ``?gemm`` on :func:`_block` for ``dtype`` (``isz`` bytes; see :func:`fma_gemm`);
    ``nc`` columns of C per block."""
    if layout != _ROW_MAJOR:  # column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T
        m, n, a, lda, b, ldb = n, m, b, ldb, a, lda
        trans_a, trans_b = trans_b, trans_a
    if m <= 0 or n <= 0:
        return
    zero = dtype(0)
    m64, n64, k64 = np.int64(m), np.int64(n), max(np.int64(k), np.int64(0))
    ldb_b, ldc_b = np.int64(ldb) * isz, np.int64(ldc) * isz
    if alpha == 0 or k64 == 0:  # C = beta C, A and B not read (BLAS's rule; beta = 0 writes zeros)
        for r in range(m64):
            for j in range(n64):
                at = c + r * ldc_b + j * isz
                _store(at, beta * _load(at, zero) if beta != 0 else zero)
        return
    # A's element (r, kk) at a + r * sa_r + kk * sa_k
    if trans_a == _NO_TRANS:
        sa_r, sa_k = np.int64(lda) * isz, isz
    else:
        sa_r, sa_k = isz, np.int64(lda) * isz
    b_rows = trans_b == _NO_TRANS
    panel = np.empty((min(k64, KC), nc), dtype)  # B's rows k0 ... k0 + KC of one block of columns
    cb = np.empty((ROWS, nc), dtype)  # C of a partial block of columns
    pp, cp = np.int64(panel.ctypes.data), np.int64(cb.ctypes.data)
    lanes = nc // _REGS_HERE
    for n0 in range(0, n64, nc):
        cols = min(nc, n64 - n0)
        # whole vectors of columns go in place (the last block may have fewer of them); a tail
        # that is not a whole vector goes through cb (zero-padded panel columns)
        nregs = (cols + lanes - 1) // lanes
        whole = cols % lanes == 0
        for k0 in range(0, k64, KC):
            kn = min(KC, k64 - k0)
            beta_k = beta if k0 == 0 else dtype(1)  # later slices of K add to C
            # B's block is copied into the panel even where its rows lie in place: rows far apart
            # (a 256-column B) evict each other from L1 in the K loop (256-bit blocks on Zen 4:
            # 66-88 GFLOP/s in place, 105-111 copied; 512-bit blocks the same either way)
            if b_rows and whole:
                for kk in range(kn):
                    _copy_row_of(nregs, pp + kk * nc * isz, b + (k0 + kk) * ldb_b + n0 * isz, alpha)
            else:
                panel[:kn] = zero
                for j in range(cols):
                    if b_rows:  # B (k, n): column n0 + j
                        src, step = b + k0 * ldb_b + (n0 + j) * isz, ldb_b
                    else:  # B given as its transpose (n, k): row n0 + j
                        src, step = b + (n0 + j) * ldb_b + k0 * isz, isz
                    for kk in range(kn):
                        panel[kk, j] = _load(src + kk * step, zero)
            for m0 in range(0, m64, ROWS):
                rows = min(np.int64(ROWS), m64 - m0)
                ap = a + m0 * sa_r + k0 * sa_k
                cm = c + m0 * ldc_b + n0 * isz
                if whole:
                    _block_of(nregs, ap, sa_r, sa_k, pp, nc * isz, cm, ldc_b, kn, rows, alpha, beta_k)
                else:  # into cb, then the valid columns
                    for r in range(rows):
                        for j in range(cols):
                            cb[r, j] = _load(cm + r * ldc_b + j * isz, zero) if beta_k != 0 else zero
                    _block_of(nregs, ap, sa_r, sa_k, pp, nc * isz, cp, nc * isz, kn, rows, alpha, beta_k)
                    for r in range(rows):
                        for j in range(cols):
                            _store(cm + r * ldc_b + j * isz, cb[r, j])


def _sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    _gemm(np.float32, np.int64(4), _NC32, layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


def _dgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    _gemm(np.float64, np.int64(8), _NC64, layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


def _signature(dtype):
    """``cblas_?gemm``'s C signature, the pointers as int64 (the x86-64 calling conventions pass a
    pointer and a 64-bit integer alike)."""
    scalar = types.float32 if dtype == np.float32 else types.float64
    i32 = types.int32
    return types.void(
        i32, i32, i32, i32, i32, i32, scalar, types.int64, i32, types.int64, i32, scalar, types.int64, i32
    )


@functools.cache
def _compiled(dtype_name: str) -> int:
    from numba import cfunc

    dtype = np.float32 if dtype_name == "float32" else np.float64
    return cfunc(_signature(dtype), cache=_CACHE)(_sgemm if dtype_name == "float32" else _dgemm).address


def fma_gemm(dtype_name: str) -> int:
    """The address of a C function with CBLAS's ``cblas_sgemm`` (``float32``) or ``cblas_dgemm``
    (``float64``) signature and meaning (row- or column-major, either operand transposed, any
    alpha and beta; beta = 0 does not read C, alpha = 0 reads neither A nor B), computing on this
    CPU's vector FMA; 0 for another dtype or where :func:`fma_ready` is false. Compiled once per
    process (from Numba's disk cache where it is on), re-entrant and single-threaded, as the
    kernels need a provider to be. Integer arguments are not checked as a BLAS checks them (the
    kernels pass valid ones)."""
    if dtype_name not in ("float32", "float64") or not fma_ready():
        return 0
    return _compiled(dtype_name)
