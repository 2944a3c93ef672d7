"""Codes the kernels and their wrappers share: which mask applies, and what a tile of a mask holds.

Plain ints, so Numba compiles them as constants; defined once here and imported everywhere else
(``engine.problems.mods`` re-exports the tile codes as ``EMPTY``/``PARTIAL``/``FULL``).
"""

#: which of the kernel's two mask slots applies: none, boolean (True = may attend), float (added)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

#: a (query tile, key tile) block of a mask: nothing visible, some elements visible, all visible
TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2
