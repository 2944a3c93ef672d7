"""Let LLVM use the CPU's widest vectors in one kernel function.

On CPUs with AVX-512, LLVM's tuning for most Intel cores (and Numba's host CPU name under some
hypervisors) says "prefer 256-bit vectors": its loop vectoriser then emits 8-lane ``ymm`` code even
where 16-lane ``zmm`` code is legal. Clang's ``-mprefer-vector-width=512`` lifts that per function
with two function attributes, which :func:`wide_vectors` adds to the function it is called in. The
``cpu`` forward kernel's softmax pass over a score tile (an exp, a sum and a max per score) runs
1.4x faster that way on an AVX-512 Xeon (0.40 -> 0.28 ns per score, one thread). On a CPU without
AVX-512 the attributes change nothing (LLVM's widest vector there is 256 bits).

The attributes are compiled into the function's code, so they travel with Numba's disk cache,
whose index is keyed by the CPU it was compiled for.
"""

import functools

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["target_features", "wide_vectors"]

#: clang's attributes for -mprefer-vector-width=512 (the X86 backend reads both per function)
_WIDE = ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"')


class _WideFunctionAttributes(ir.values.FunctionAttributes):
    """llvmlite's function attributes plus :data:`_WIDE` (llvmlite accepts only keyword attributes;
    these are string attributes, so they are appended where the attribute list is written)."""

    def __bool__(self):  # written even when no keyword attribute is set
        return True

    def _to_list(self, ret_type):
        return super()._to_list(ret_type) + list(_WIDE)


@intrinsic
def wide_vectors(typingctx):
    """Mark the calling function (after Numba's inlining: the function whose body contains this
    call) for 512-bit vectors; a no-op at run time."""

    def codegen(context, builder, signature, args):
        attrs = builder.function.attributes
        if type(attrs) is ir.values.FunctionAttributes:
            attrs.__class__ = _WideFunctionAttributes
        return context.get_dummy_value()

    return types.none(), codegen


@functools.cache
def target_features() -> frozenset:
    """The features of the CPU Numba compiles for, LLVM's names (``avx512f``, ``amx-bf16``...):
    ``numba.config``'s target where one is set (LLVM cannot emit an instruction for a target
    without it; a ``NUMBA_CPU_NAME`` without features, as for portable caches, counts as none),
    else the host's."""
    import llvmlite.binding as ll
    import numba

    if numba.config.CPU_FEATURES:
        return frozenset(f[1:] for f in numba.config.CPU_FEATURES.split(",") if f.startswith("+"))
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return frozenset()
    return frozenset(name for name, on in ll.get_host_cpu_features().items() if on)
