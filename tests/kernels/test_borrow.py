"""``engine.kernels.cpu.borrow``: views without reference counting read and write the array they
were borrowed from."""

import numpy as np
from numba import njit

from engine.kernels.cpu.borrow import borrowed, flat, keep_alive


@njit
def _scaled_rows(a, rows, factor):
    # a view of a view of a borrowed array, written through, and a scratch array kept alive
    scratch = np.empty(a.shape[1])
    s = borrowed(scratch)
    b = borrowed(a)
    view = b[rows[0] : rows[1]].T
    for j in range(view.shape[1]):
        s[:] = view[:, j]
        for i in range(s.shape[0]):
            view[i, j] = s[i] * factor
    keep_alive(scratch)
    return b.shape, b.strides


def test_borrowed_views_are_the_arrays_own_memory():
    a = np.arange(24.0).reshape(4, 6)
    want = a.copy()
    want[1:3] *= 2.0
    shape, strides = _scaled_rows(a, (1, 3), 2.0)
    np.testing.assert_array_equal(a, want)
    assert shape == a.shape and strides == a.strides
    column = np.asfortranarray(np.arange(12.0).reshape(3, 4))  # other strides: kept as they are
    _scaled_rows(column, (0, 2), -1.0)
    np.testing.assert_array_equal(column, np.where(np.arange(3)[:, None] < 2, -1, 1) * np.arange(12.0).reshape(3, 4))


@njit
def _flat_of_rows(a, b, h, j0, j1):
    tile = a[b, h, j0:j1]  # a C-contiguous block of rows, as the forward's value tiles
    f = flat(tile)
    for i in range(f.shape[0]):
        f[i] += 1.0
    return f.shape[0], f[0], f[f.shape[0] - 1]


def test_flat_is_the_rows_memory_in_order():
    a = np.arange(2 * 3 * 5 * 4, dtype=np.float64).reshape(2, 3, 5, 4)
    want = a.copy()
    want[1, 2, 1:4] += 1.0
    n, first, last = _flat_of_rows(a, 1, 2, 1, 4)
    assert (n, first, last) == (12, want[1, 2, 1, 0], want[1, 2, 3, 3])
    np.testing.assert_array_equal(a, want)
