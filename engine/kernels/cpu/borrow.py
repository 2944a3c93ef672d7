"""Array views without reference counting, for the hot loops of the ``cpu`` kernels.

Numba counts references to an array's memory (its NRT meminfo) with atomic instructions: every
slice, reshape or transpose of an array makes a view that increments the count, and decrements it
when the view dies. A ``cpu`` forward task makes a few dozen views per tile; at small tiles (one
32 x 32 tile per head at L = 32, E = 64) those atomic operations took 15% of the kernel's time
(``perf`` on an Intel Xeon, 2026-12). :func:`borrowed` gives a view of the whole array that has no
meminfo, so that the views taken from it count nothing.

The rule that makes it safe: a borrowed view must not outlive the array it was taken from. The
kernels borrow their arguments (alive for the whole call) and their own scratch, which they keep
alive to the end of the task with :func:`keep_alive` (Numba frees a variable after its last use).
A borrowed view is never returned, stored or passed to a parallel loop.
"""

from numba import types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

__all__ = ["borrowed", "flat", "keep_alive", "readonly_like"]


@intrinsic
def borrowed(typingctx, a):
    """``a`` itself (same data, shape, strides and type) without its meminfo and parent: views
    taken from it do no reference counting. It must not outlive ``a`` (see the module)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(a)(context, builder, args[0])
        out = context.make_array(a)(context, builder)
        context.populate_array(
            out,
            data=src.data,
            shape=src.shape,
            strides=src.strides,
            itemsize=src.itemsize,
            meminfo=None,
        )
        return out._getvalue()

    return a(a), codegen


@intrinsic
def flat(typingctx, a):
    """A C-contiguous array as 1-D, borrowed (no meminfo, as :func:`borrowed`): what ``ravel``
    gives without its call into Numba's runtime, so that a loop over a small tile runs as one
    long vectorised loop instead of one short loop per row."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None
    out_ty = a.copy(ndim=1, layout="C")

    def codegen(context, builder, signature, args):
        src = context.make_array(a)(context, builder, args[0])
        out = context.make_array(out_ty)(context, builder)
        n = context.get_constant(types.intp, 1)
        for i in range(a.ndim):
            n = builder.mul(n, builder.extract_value(src.shape, i))
        context.populate_array(
            out,
            data=src.data,
            shape=[n],
            strides=[src.itemsize],
            itemsize=src.itemsize,
            meminfo=None,
        )
        return out._getvalue()

    return out_ty(a), codegen


@intrinsic
def keep_alive(typingctx, a):
    """Nothing; a use of ``a``, so that Numba keeps it (and the memory of the views borrowed
    from it) alive up to here."""

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.none(a), codegen


@intrinsic
def readonly_like(typingctx, a, like):
    """``a`` itself, typed read-only when ``like`` is (the same data and reference count): a
    scratch tile that stands in for a read-only input's tile then has the input's type, so the
    code that reads either compiles once (each Numba array type is another compilation)."""
    if not (isinstance(a, types.Array) and isinstance(like, types.Array)):
        return None
    out_ty = a.copy(readonly=like.mutable is False)

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, out_ty, args[0])

    return out_ty(a, like), codegen
