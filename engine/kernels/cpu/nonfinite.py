"""Non-finite values in V, inside the kernels: a NaN or inf value must reach exactly the rows that
give its key a weight > 0 (as in the ``reference`` oracle), but a BLAS product computes
0 * NaN = NaN for the rows that give it weight 0.

Rather than screen V before every call (a full pass over V), each tile's product ``p @ v`` is
checked after BLAS computed it: a pass over the small (rows, Ev) result. Only a product that is not
finite is recomputed exactly, leaving out the keys of weight 0. Finite inputs pay only the check.
"""

import math

from numba import njit


@njit(fastmath={"contract", "reassoc", "nsz", "arcp"}, error_model="numpy")
def redo_if_nonfinite(p, v, pv):
    """``pv`` (rows, Ev) holds ``p @ v`` for weights ``p`` (rows, keys) and values ``v``
    (keys, Ev). If any entry of ``pv`` is NaN or inf, recompute ``pv`` as the sum over keys of
    weight > 0 (or NaN) only. Returns whether it recomputed."""
    rows, Ev = pv.shape
    finite = True
    for r in range(rows):
        for c in range(Ev):
            finite &= math.isfinite(pv[r, c])
    if finite:
        return False
    zero = pv.dtype.type(0)
    for r in range(rows):
        for c in range(Ev):
            total = zero
            for k in range(p.shape[1]):
                w = p[r, k]
                if w > zero or w != w:
                    total += w * v[k, c]
            pv[r, c] = total
    return True
