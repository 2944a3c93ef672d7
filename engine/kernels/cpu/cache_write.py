"""Writing a decode step's new keys and values into a host KV cache, compiled (the cpu decode op).

NumPy's advanced-index assignment of the same write costs about ten microseconds of index arrays
and views per call, which is most of a decode step at short lengths. Here it is a loop over the
new tokens' cache slots, reached through the page table (a contiguous cache is one page per
sequence), with the slots' old contents saved first so that a call that fails afterwards restores
them (the "nothing half-written" promise). Only the same dtype on both sides (a copy of bits: 16-bit
entries arrive as ``uint16`` views); a conversion takes NumPy's path, which rounds as NumPy does.

The rows are copied element by element, not as ``dst[...] = src[...]``: Numba compiles an array
assignment's shape-mismatch error message (``str`` of each dimension, ``join``), 2-4 s of this
module's first compile for a message that cannot occur here (the shapes are equal by construction).
"""

from numba import njit, types
from numba.extending import intrinsic

from ...runtime.jit_cache import cache_enabled

_CACHE = cache_enabled()

__all__ = ["_save_and_write", "_restore"]


@intrinsic
def _data_address(typingctx, a):
    """The address of ``a``'s first element (``a.ctypes.data`` builds a ctypes view per call)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(arr.data, context.get_value_type(types.intp))

    return types.intp(a), codegen


@njit(cache=_CACHE, inline="always")
def _extent(a):
    """``(lo, hi)``: the byte addresses ``a``'s elements lie within (any strides)."""
    lo = _data_address(a)
    hi = lo + a.itemsize
    for i in range(a.ndim):
        if a.shape[i] == 0:
            return lo, lo
        step = (a.shape[i] - 1) * a.strides[i]
        if step < 0:
            lo += step
        else:
            hi += step
    return lo, hi


@njit(cache=_CACHE)
def _save_and_write(k_pages, v_pages, table, seqlens_k, key, value, old_k, old_v):
    """Token t of sequence b goes to slot ``seqlens_k[b] - L_new + t`` (``seqlens_k``: the keys
    after the write): page ``table[b, slot // page_size]``, offset ``slot % page_size``, all heads.
    ``old_k``/``old_v`` (B, Hkv, L_new, D/Dv) receive what the slots held. Returns True; False,
    writing nothing, when ``key`` or ``value`` lie in a cache's memory (views of its slots): the
    caller then passes copies, so that every slot gets what the entries held before the call, as
    NumPy's assignment gives (an address-range test here, nanoseconds; a copy made in here would
    make every call pay for reference counting)."""
    k_lo, k_hi = _extent(k_pages)
    v_lo, v_hi = _extent(v_pages)
    a_lo, a_hi = _extent(key)  # (key and value may differ in layout: no loop over the pair)
    b_lo, b_hi = _extent(value)
    if (a_lo < k_hi and k_lo < a_hi) or (a_lo < v_hi and v_lo < a_hi):
        return False
    if (b_lo < k_hi and k_lo < b_hi) or (b_lo < v_hi and v_lo < b_hi):
        return False
    B, Hkv, Ln, _ = key.shape
    ps = k_pages.shape[2]
    for b in range(B):
        for t in range(Ln):
            pos = seqlens_k[b] - Ln + t
            page = table[b, pos // ps]
            off = pos - (pos // ps) * ps
            for h in range(Hkv):  # element loops: see the module on array assignment
                for d in range(key.shape[3]):
                    old_k[b, h, t, d] = k_pages[page, h, off, d]
                    k_pages[page, h, off, d] = key[b, h, t, d]
                for d in range(value.shape[3]):
                    old_v[b, h, t, d] = v_pages[page, h, off, d]
                    v_pages[page, h, off, d] = value[b, h, t, d]
    return True


@njit(cache=_CACHE)
def _restore(k_pages, v_pages, table, seqlens_k, old_k, old_v):
    """Undo :func:`_save_and_write` (in reverse order)."""
    B, Hkv, Ln, _ = old_k.shape
    ps = k_pages.shape[2]
    for b in range(B - 1, -1, -1):
        for t in range(Ln - 1, -1, -1):
            pos = seqlens_k[b] - Ln + t
            page = table[b, pos // ps]
            off = pos - (pos // ps) * ps
            for h in range(Hkv):
                for d in range(old_k.shape[3]):
                    k_pages[page, h, off, d] = old_k[b, h, t, d]
                for d in range(old_v.shape[3]):
                    v_pages[page, h, off, d] = old_v[b, h, t, d]
