"""Numba's warnings belong where their cause is.

* A mod that Numba cannot type fails with Numba's ``TypingError`` from its own compilation, and
  whatever Numba warns while typing it points at the mod's source line. Before, the ``cpu``
  kernels typed the mod while compiling themselves, so a mod holding an empty dict literal
  (``{}.get(q_idx, 0.0)``: a typed dict of undefined key and value types, into which Numba
  "casts" the int64 key and float64 default) surfaced as ``NumbaTypeSafetyWarning: unsafe cast
  from float64 to undefined`` from ``engine/kernels/cpu/decode.py``.
* ``tile_gemm``'s ``np.dot`` fallback for an operand of layout 'A' compiled with Numba's
  ``NumbaPerformanceWarning`` (misnamed "np.vdot() is faster on contiguous arrays"); it now makes
  the copy Numba made anyway itself, without the warning.

The pytest configuration turns Numba warnings attributed to engine code into errors, so neither
can come back unnoticed.
"""

import os
import warnings

import numpy as np
import pytest
from numba.core.errors import NumbaTypeSafetyWarning, NumbaWarning, TypingError

import engine


def _dict_mods():
    """New function objects each time: Numba remembers a failed compilation per function and
    signature, and would not type (nor warn about) the same mod twice in a process."""

    def dict_mod(score, b, h, q_idx, kv_idx):
        return score + {}.get(q_idx, 0.0)  # an empty dict literal: Numba warns, then cannot type it

    def dict_mask(b, h, q_idx, kv_idx):
        return {}.get(q_idx, True)

    return dict_mod, dict_mask


def _calls(rng):
    _, dict_mask = _dict_mods()
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    kc = np.zeros((1, 2, 16, 8), np.float32)
    new = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    out, lse = engine.scaled_dot_product_attention(q, q, q, return_lse=True)
    return {
        "forward": lambda **mods: engine.scaled_dot_product_attention(q, q, q, backend="cpu", **mods),
        "decode": lambda **mods: engine.attention_with_kvcache(
            q[:, :, :1], kc, kc.copy(), key=new, value=new, cache_seqlens=3, backend="cpu", **mods
        ),
        "forward mask_mod": lambda **mods: engine.scaled_dot_product_attention(
            q, q, q, backend="cpu", mask_mod=dict_mask
        ),
        "backward mask_mod": lambda **mods: engine.scaled_dot_product_attention_backward(
            out, q, q, q, out, lse, backend="cpu", mask_mod=dict_mask
        ),
    }


@pytest.mark.parametrize("call", ["forward", "decode", "forward mask_mod", "backward mask_mod"])
def test_an_untypable_mod_warns_and_fails_at_its_own_line(call, rng):
    fn = _calls(rng)[call]
    mods = {} if "mask_mod" in call else {"score_mod": _dict_mods()[0]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypingError):
            fn(**mods)
    numba_warnings = [w for w in caught if issubclass(w.category, NumbaWarning)]
    assert any(issubclass(w.category, NumbaTypeSafetyWarning) for w in numba_warnings)
    for w in numba_warnings:
        assert os.path.samefile(w.filename, __file__), (w.filename, w.lineno, str(w.message))


def test_tile_gemm_fallback_compiles_without_a_performance_warning(rng):
    """A fresh compilation (no disk cache) of tile_gemm for an operand of layout 'A'."""
    import numba

    from engine.kernels.cpu.gemm import GEMM_NUMPY, tile_gemm

    fresh = numba.njit(tile_gemm.py_func)
    big = rng.standard_normal((12, 10))
    a, b = big[::2, ::2], rng.standard_normal((5, 3))
    c = np.full((6, 3), np.nan)
    c2 = np.full((6, 3), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumbaWarning)
        fresh(GEMM_NUMPY, 0, a, b, c)  # rows and columns strided
        fresh(GEMM_NUMPY, 0, big[:6, :5], b[::-1], c2)  # a column slice, negative strides
    np.testing.assert_allclose(c, a @ b, rtol=0, atol=1e-13)
    np.testing.assert_allclose(c2, big[:6, :5] @ b[::-1], rtol=0, atol=1e-13)
