"""Every specialisation of the CUDA kernel compiles to PTX for compute capability 9.0 (H100), and
for the others ``ATTENTION_ENGINE_PTX_CCS`` names (as ``8.0,9.0`` for the A100 too).

``numba.cuda.compile_ptx`` types and lowers the kernel exactly as a GPU launch would, so it catches
typing errors the simulator (which runs the kernel as Python) cannot see. It needs no GPU, but it
needs NVVM and NVRTC: the ``nvidia-nvvm`` and ``nvidia-cuda-nvrtc`` wheels that
``numba-cuda[cu13]`` installs (or a CUDA toolkit). Without them these tests fail with Numba's
"libnvrtc"/"libNVVM" not-found error: that is a broken test install, not a skip.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile_ptx needs the real CUDA target, not the simulator", allow_module_level=True)

import types  # noqa: E402

from numba import cuda  # noqa: E402

from engine.backends.cuda.forward import tile_sizes  # noqa: E402
from engine.kernels.cuda.flash_fwd import (
    MASK_BOOL,
    MASK_FLOAT,
    MASK_NONE,
    flash_kernel_source,
    kernel_signature,
    shared_bytes,
)

from ptx_targets import PTX_CCS, all_pairs, cc_id  # noqa: E402
from testmods import window_mod  # noqa: E402

# (mask kind, causal): the combinations the backend launches (is_causal excludes attn_mask)
KINDS = [(MASK_NONE, False), (MASK_NONE, True), (MASK_BOOL, False), (MASK_FLOAT, False)]
# head sizes (E, Ev) with the backend's own tiles, plus the tiny tiles of the simulator tests
HEADS = [(64, 64), (128, 128), (8, 5)]


def _mask_dtype(kind, dtype):
    return dtype if kind == MASK_FLOAT else np.bool_


@pytest.fixture
def current_device(monkeypatch):
    """Numba compiles a kernel's device functions (the mods, overloads such as ``cast_like``) for
    the *current* device's compute capability, even inside ``compile_ptx``; with no GPU here, the
    test says which one that is (the one it compiles the kernel for)."""
    from numba.cuda import dispatcher

    def at(cc):
        if not cuda.is_available():
            monkeypatch.setattr(dispatcher, "get_current_device", lambda: types.SimpleNamespace(compute_capability=cc))

    return at


def _kind_id(kind):
    return ["none", "bool", "float"][kind[0]] + ("-causal" if kind[1] else "")


# every (kind, heads) pair, each dtype with every kind and every head size (ptx_targets.all_pairs)
PAIRS = all_pairs([np.float32, np.float16], KINDS, HEADS)


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize(
    ("dtype", "kind", "heads"), PAIRS, ids=[f"{np.dtype(d).name}-{_kind_id(k)}-E{h[0]}-Ev{h[1]}" for d, k, h in PAIRS]
)
def test_kernel_compiles_to_ptx(current_device, dtype, kind, heads, cc):
    current_device(cc)
    E, Ev = heads
    block_q, block_k = tile_sizes(E, Ev)
    mask_kind, causal = kind
    fn = flash_kernel_source(E, Ev, block_q, block_k, mask_kind, causal)
    ptx, restype = cuda.compile_ptx(fn, kernel_signature(dtype, _mask_dtype(mask_kind, dtype)), cc=cc)
    assert str(restype) == "none"
    assert re.search(rf"^\.target sm_{cc[0]}{cc[1]}\b", ptx, re.M)
    assert re.search(r"^\.visible \.entry \S*_flash_forward", ptx, re.M)
    assert not re.search(r"^\s*call(\.uni)?\b", ptx, re.M)  # everything inlined
    # the two staged tiles are the kernel's only shared memory, and they fit the static limit
    smem = sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]", ptx))
    assert smem == shared_bytes(E, Ev, block_k) <= 48 * 1024
    # float16 storage is converted to float32 for arithmetic, and back only when stored
    if dtype == np.float16:
        assert "cvt.f32.f16" in ptx and "cvt.rn.f16.f32" in ptx
    # causal kernels never need the mask; boolean masks are read as bytes
    if mask_kind == MASK_BOOL:
        assert re.search(r"ld\.global\.(u8|s8)", ptx)
    # the scores go through exp (libdevice's expf: ex2.approx after range reduction), never f64
    assert "ex2.approx" in ptx
    assert not re.search(r"\b(add|mul|fma\.rn)\.f64\b", ptx)


# -- kernels with mods ---------------------------------------------------------------------------


def _mods():
    import numba

    from variants.alibi import alibi_bias, alibi_slopes
    from variants.document import same_document
    from variants.softcap import tanh_softcap

    slopes = alibi_slopes(8).astype(np.float32)
    ids = np.zeros((2, 64), dtype=np.int64)
    return {
        "alibi": (alibi_bias, None, (slopes,)),
        "softcap": (tanh_softcap, None, (np.float32(50.0),)),
        "window": (None, window_mod, (128, 0)),
        "document": (None, same_document, (ids,)),
        "alibi-window-njit": (numba.njit(alibi_bias), numba.njit(lambda b, h, i, j, s: j <= i), (slopes,)),
    }


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize("name", list(_mods()))
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_kernels_with_mods_compile_to_ptx(current_device, dtype, name, cc):
    current_device(cc)
    score_mod, mask_mod, mod_args = _mods()[name]
    block_q, block_k = tile_sizes(64, 64)
    fn = flash_kernel_source(64, 64, block_q, block_k, MASK_NONE, False, score_mod, mask_mod)
    ptx, restype = cuda.compile_ptx(fn, kernel_signature(dtype, None, mod_args), cc=cc)
    assert str(restype) == "none"
    assert re.search(r"^\.visible \.entry \S*_flash_forward", ptx, re.M)
    # the mods are inlined into the kernel, not called
    assert not re.search(r"^\s*call(\.uni)?\b", ptx, re.M)
    # float32 parameters keep the arithmetic in float32 (cast_like, float32 slopes and cap)
    assert not re.search(r"\b(add|sub|mul|fma\.rn)\.f64\b", ptx)
    if name == "softcap":  # fast_tanh is libdevice's tanhf on the GPU
        assert "tanh" in ptx
    if mask_mod is not None:  # the block map is read: empty key tiles are skipped
        assert re.search(r"ld\.global\.(u8|s8)", ptx)


# -- bfloat16 storage (uint16 bit patterns, converted in registers) ------------------------------


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize("heads", HEADS[:2], ids=lambda h: f"E{h[0]}-Ev{h[1]}")
@pytest.mark.parametrize("kind", KINDS, ids=_kind_id)
def test_bfloat16_kernels_compile_to_ptx(current_device, kind, heads, cc):
    current_device(cc)
    E, Ev = heads
    block_q, block_k = tile_sizes(E, Ev)
    mask_kind, causal = kind
    bf16_mask = mask_kind == MASK_FLOAT
    fn = flash_kernel_source(E, Ev, block_q, block_k, mask_kind, causal, bf16=True, mask_bf16=bf16_mask)
    mask = np.uint16 if bf16_mask else np.bool_
    ptx, restype = cuda.compile_ptx(fn, kernel_signature(np.uint16, mask), cc=cc)
    assert str(restype) == "none"
    assert re.search(r"^\.visible \.entry \S*_flash_forward", ptx, re.M)
    # the conversions are inlined bit operations: no call, no float16 or float64 arithmetic
    assert not re.search(r"^\s*call(\.uni)?\b", ptx, re.M)
    assert not re.search(r"\b(add|sub|mul|fma\.rn)\.f64\b", ptx)
    assert "cvt.f32.f16" not in ptx
    # 16-bit loads of q/k/v (and of a float mask), 16-bit stores of out and lse
    assert re.search(r"ld\.global\.(u16|b16)", ptx)
    assert re.search(r"st\.global\.(u16|b16)", ptx)
    smem = sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]", ptx))
    assert smem == shared_bytes(E, Ev, block_k) <= 48 * 1024
