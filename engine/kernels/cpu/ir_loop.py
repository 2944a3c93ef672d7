"""A counted loop in LLVM IR with values carried in registers across its iterations: the loop the
register-blocked kernels written as vector IR share (``decode_rows``' passes over cache rows,
``fma_gemm``'s and ``avx512_bf16``'s K loops), their accumulators kept as phi nodes."""

from llvmlite import ir

__all__ = ["counted_loop"]

_I64 = ir.IntType(64)


def counted_loop(builder, n, carried, body):
    """``for j in range(n)`` (``n`` an LLVM i64) with ``carried`` values (LLVM values) carried
    across iterations; ``body(j, values) -> new values`` emits one iteration at the builder's
    position. Returns the carried values after the loop (``carried`` itself where ``n <= 0``)."""
    entry = builder.block
    head = builder.append_basic_block("rows.body")
    done = builder.append_basic_block("rows.done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(_I64, 0)), head, done)
    builder.position_at_end(head)
    j = builder.phi(_I64)
    j.add_incoming(ir.Constant(_I64, 0), entry)
    phis = []
    for v in carried:
        phi = builder.phi(v.type)
        phi.add_incoming(v, entry)
        phis.append(phi)
    new = body(j, phis)
    j_next = builder.add(j, ir.Constant(_I64, 1))
    last = builder.block
    j.add_incoming(j_next, last)
    for phi, v in zip(phis, new):
        phi.add_incoming(v, last)
    builder.cbranch(builder.icmp_signed("<", j_next, n), head, done)
    builder.position_at_end(done)
    outs = []
    for start, v in zip(carried, new):
        out = builder.phi(v.type)
        out.add_incoming(start, entry)
        out.add_incoming(v, last)
        outs.append(out)
    return outs
