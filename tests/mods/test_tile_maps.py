"""The tile map of a ``mask_mod`` (which (query tile, key tile) blocks are empty, partial or full)
on the masks that tell a correct classification from an off-by-one one: all allowed, none, all but
one element, exactly one element, at every position of a tile, checked against a brute-force
classification; and the cpu kernel on a mask that hides one element at a tile's last position."""

import numpy as np
import pytest

import engine
from engine.backends.cpu.blas_pin import get_blas_pin
from engine.backends.cpu.tiles import tile_sizes
from engine.problems.mods import EMPTY, FULL, PARTIAL

from testmods import table_mod
from tolerances import assert_out_close, out_atol

L, S, BQ, BK = 10, 11, 4, 4  # partial edge tiles on both axes


def _brute_force(table, bq, bk):
    nq, nk = -(-table.shape[0] // bq), -(-table.shape[1] // bk)
    kinds = np.empty((nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            block = table[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            kinds[i, j] = EMPTY if not block.any() else (FULL if block.all() else PARTIAL)
    return kinds


def _tables():
    """Name and table: all, none, and for every element of the first tile, of a middle tile and of
    the ragged last tile, all-but-that-one and only-that-one."""
    yield "all", np.ones((L, S), bool)
    yield "none", np.zeros((L, S), bool)
    tiles = [(0, 0), (4, 4), (8, 8)]  # first, middle, last (3 x 2 ... 2 x 3 elements)
    for i0, j0 in tiles:
        for i in range(i0, min(i0 + BQ, L)):
            for j in range(j0, min(j0 + BK, S)):
                hide = np.ones((L, S), bool)
                hide[i, j] = False
                yield f"all-but-{i},{j}", hide
                yield f"only-{i},{j}", ~hide


TABLES = list(_tables())


def test_tile_map_matches_brute_force_on_all_none_all_but_one_exactly_one():
    wrong = []
    for name, table in TABLES:
        bm = engine.create_block_mask(table_mod, None, None, L, S, mod_args=(table,), block_q=BQ, block_k=BK)
        expected = _brute_force(table, BQ, BK)
        if not np.array_equal(bm.kinds[0, 0], expected):
            wrong.append(name)
    assert not wrong, f"tile maps differ from brute force for {wrong[:10]} ({len(wrong)} tables)"
    assert len(TABLES) > 50


def test_tile_map_derived_for_other_tile_sizes_matches_brute_force():
    name, table = TABLES[5]
    bm = engine.create_block_mask(table_mod, None, None, L, S, mod_args=(table,), block_q=BQ, block_k=BK)
    for bq, bk in ((2, 3), (5, 5), (10, 11), (1, 1)):
        np.testing.assert_array_equal(bm.kinds_at(bq, bk)[0, 0], _brute_force(table, bq, bk), err_msg=f"{bq}x{bk}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pattern", ["hide-last-of-first-tile", "show-only-last-of-first-tile"])
def test_cpu_kernel_with_one_element_at_a_tiles_last_position(dtype, pattern):
    """At the cpu kernel's own tile sizes, one element at the last row and column of the first
    tile decides whether the tile is partial: calling it full (or empty) changes that row."""
    bq, bk = tile_sizes(1 << 20, 16, 16, blas_pinned=get_blas_pin().available)
    Lk, Sk = bq + 7, bk + 5  # a second, partial tile on both axes
    table = np.ones((Lk, Sk), bool) if pattern.startswith("hide") else np.zeros((Lk, Sk), bool)
    table[bq - 1, bk - 1] = not table[bq - 1, bk - 1]
    table[:, -1] |= pattern.startswith("show")  # every row sees something outside the first tile
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((1, 2, Lk, 16), (1, 2, Sk, 16), (1, 2, Sk, 16)))
    k[..., bk - 1, :] = 3 * q[..., bq - 1, :].mean(axis=0)  # a large weight for the decisive element
    out = engine.scaled_dot_product_attention(q, k, v, mask_mod=table_mod, mod_args=(table,), backend="cpu")
    ref = engine.scaled_dot_product_attention(q, k, v, mask_mod=table_mod, mod_args=(table,), backend="reference")
    assert_out_close(out, ref, out_atol(dtype, q, k, v, None), what="one-element tile")
