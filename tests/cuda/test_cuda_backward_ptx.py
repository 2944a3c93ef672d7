"""Every specialisation of the ``cuda`` backend's backward kernels (and the forward with dropout)
compiles to PTX for compute capability 9.0 (and the others ``ATTENTION_ENGINE_PTX_CCS`` names, as 8.0).

``numba.cuda.compile_ptx`` types and lowers a kernel as a launch would, so it catches typing errors
the simulator cannot see (see ``tests/cuda/test_cuda_ptx.py``; it needs the NVVM and NVRTC wheels of
``numba-cuda[cu13]``, and their absence is a failure, not a skip). Checked in the PTX: everything is
inlined (no ``call``: the mods, their derivatives, Philox, the bfloat16 conversions), no float64
arithmetic for 32-bit and 16-bit inputs (float32 throughout; Philox is integer arithmetic), and the
static shared memory fits 48 KiB.
"""

from __future__ import annotations

import os
import re
import types

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile_ptx needs the real CUDA target, not the simulator", allow_module_level=True)

from numba import cuda  # noqa: E402

from engine.backends.cuda.backward import backward_tile_sizes
from engine.backends.cuda.forward import tile_sizes  # noqa: E402
from engine.kernels.cuda.flash_bwd import backward_kernel_sources, backward_shared_bytes, backward_signatures
from engine.kernels.cuda.flash_fwd import flash_kernel_source, kernel_signature
from engine.kernels.kinds import MASK_BOOL, MASK_FLOAT, MASK_NONE  # noqa: E402

from ptx_targets import PTX_CCS, all_pairs, cc_id  # noqa: E402
from testmods import window_mod  # noqa: E402

KINDS = [(MASK_NONE, False), (MASK_NONE, True), (MASK_BOOL, False), (MASK_FLOAT, False)]
KIND_IDS = ["none", "causal", "bool", "float"]
F64 = re.compile(r"\b(add|sub|mul|div\.rn|fma\.rn)\.f64\b")
CALL = re.compile(r"^\s*call(\.uni)?\b", re.M)
SHARED = re.compile(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]")


@pytest.fixture
def current_device(monkeypatch):
    """Numba compiles device functions for the *current* device even inside ``compile_ptx``; with
    no GPU here, the test says which compute capability that is."""
    from numba.cuda import dispatcher

    def at(cc):
        if not cuda.is_available():
            monkeypatch.setattr(dispatcher, "get_current_device", lambda: types.SimpleNamespace(compute_capability=cc))

    return at


def _compile_all(cc, E, Ev, bq, bk, mask_kind, causal, storage, mask=None, mod_args=(), lse=np.float32, **kw):
    """PTX of (preprocess, dkdv, dq), each checked for calls, float64 and shared memory."""
    fns = backward_kernel_sources(E, Ev, bq, bk, mask_kind, causal, **kw)
    sigs = backward_signatures(storage, mask, mod_args, lse)
    ptxs = []
    for fn, sig, name in zip(fns, sigs, ("_bwd_preprocess", "_bwd_dkdv", "_bwd_dq")):
        ptx, restype = cuda.compile_ptx(fn, sig, cc=cc)
        assert str(restype) == "none"
        assert re.search(rf"^\.target sm_{cc[0]}{cc[1]}\b", ptx, re.M)
        assert re.search(rf"^\.visible \.entry \S*{name}", ptx, re.M), name
        assert not CALL.search(ptx), f"{name}: a call is left in the PTX"
        assert not F64.search(ptx), f"{name}: float64 arithmetic: {F64.search(ptx).group(0)}"
        smem = sum(int(n) for n in SHARED.findall(ptx))
        assert smem <= 48 * 1024
        ptxs.append((ptx, smem))
    # the tiled kernels' staged tiles are their only shared memory
    assert max(ptxs[1][1], ptxs[2][1]) == backward_shared_bytes(E, Ev, bq, bk)
    assert ptxs[0][1] == 0
    return [p for p, _ in ptxs]


# the backend's tiles for common heads, and the simulator tests' tiny ones; every (kind, heads)
# pair, each dtype with every kind and every head size (ptx_targets.all_pairs)
PAIRS = all_pairs([np.float32, np.float16], KINDS, [(64, 64), (128, 128), (8, 5)])
PAIR_IDS = [f"{np.dtype(d).name}-{KIND_IDS[KINDS.index(k)]}-E{h[0]}-Ev{h[1]}" for d, k, h in PAIRS]


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize(("dtype", "kind", "heads"), PAIRS, ids=PAIR_IDS)
def test_backward_kernels_compile(current_device, dtype, kind, heads, cc):
    current_device(cc)
    E, Ev = heads
    bq, bk = backward_tile_sizes(E, Ev) if heads != (8, 5) else (4, 8)
    mask_kind, causal = kind
    mask = dtype if mask_kind == MASK_FLOAT else None
    pre, dkdv, dq = _compile_all(cc, E, Ev, bq, bk, mask_kind, causal, dtype, mask)
    if dtype == np.float16:  # converted to float32 on load, back only when stored
        assert "cvt.f32.f16" in dkdv and "cvt.rn.f16.f32" in dkdv and "cvt.rn.f16.f32" in dq
    assert "ex2.approx" in dkdv and "ex2.approx" in dq  # libdevice's expf, float32
    if mask_kind == MASK_BOOL:
        assert re.search(r"ld\.global\.(u8|s8)", dq)


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_bfloat16_backward_kernels_compile(current_device, kind, cc):
    current_device(cc)
    bq, bk = backward_tile_sizes(64, 64)
    mask_kind, causal = kind
    mask = np.uint16 if mask_kind == MASK_FLOAT else None
    pre, dkdv, dq = _compile_all(
        cc, 64, 64, bq, bk, mask_kind, causal, np.uint16, mask, bf16=True, mask_bf16=mask is not None
    )
    for ptx in (dkdv, dq):
        assert "cvt.f32.f16" not in ptx  # bit operations, not float16 conversions
        assert re.search(r"st\.global\.(u16|b16)", ptx)


# every storage dtype (each case compiles six kernels)
DROPOUT_CASES = [(cc, dtype) for cc in PTX_CCS for dtype in (np.float32, np.float16, np.uint16)]


@pytest.mark.parametrize(
    ("cc", "dtype"), DROPOUT_CASES, ids=[f"sm{c[0]}{c[1]}-{np.dtype(d).name}" for c, d in DROPOUT_CASES]
)
def test_dropout_and_mask_gradient_kernels_compile(current_device, dtype, cc):
    """Philox on the device is integer arithmetic (64-bit products of 32-bit words), inlined."""
    current_device(cc)
    bf16 = dtype == np.uint16
    pre, dkdv, dq = _compile_all(
        cc, 64, 64, 64, 64, MASK_FLOAT, False, dtype, dtype, bf16=bf16, mask_bf16=bf16, dropout=True, want_dm=True
    )
    for ptx in (dkdv, dq):
        assert re.search(r"mul\.(lo|wide)\.[us](64|32)", ptx)  # the Philox rounds
    # with the mask gradient asked for, the dQ kernel stores float32 dS
    assert "st.global.f32" in dq
    # the 16-bit lse of device inputs is read in place
    _compile_all(cc, 64, 64, 64, 64, MASK_NONE, True, dtype, None, lse=dtype, bf16=bf16, lse_bf16=bf16)


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16], ids=["float32", "float16", "bfloat16"])
def test_forward_with_dropout_compiles(current_device, dtype, cc):
    current_device(cc)
    bq, bk = tile_sizes(64, 64)
    bf16 = dtype == np.uint16
    fn = flash_kernel_source(64, 64, bq, bk, MASK_NONE, True, bf16=bf16, dropout=True)
    ptx, _ = cuda.compile_ptx(fn, kernel_signature(dtype), cc=cc)
    assert not CALL.search(ptx) and not F64.search(ptx)
    assert re.search(r"mul\.(lo|wide)\.[us](64|32)", ptx)


def _mods():
    import numba

    from variants.alibi import alibi_bias, alibi_slopes
    from variants.document import same_document
    from variants.softcap import tanh_softcap

    slopes = alibi_slopes(8).astype(np.float32)
    ids = np.zeros((2, 64), dtype=np.int64)
    # (score_mod, its declared derivative or None for complex step, mask_mod, mod_args)
    return {
        "alibi": (alibi_bias, None, None, (slopes,)),  # complex step on the device (complex64)
        "softcap": (tanh_softcap, tanh_softcap.score_grad, None, (np.float32(50.0),)),
        "window": (None, None, window_mod, (128, 0)),
        "document": (None, None, same_document, (ids,)),
        "alibi-window-njit": (numba.njit(alibi_bias), None, numba.njit(lambda b, h, i, j, s: j <= i), (slopes,)),
    }


@pytest.mark.parametrize("cc", PTX_CCS, ids=cc_id)
@pytest.mark.parametrize("name", list(_mods()))
def test_backward_kernels_with_mods_compile(current_device, name, cc):
    current_device(cc)
    score_mod, grad, mask_mod, mod_args = _mods()[name]
    pre, dkdv, dq = _compile_all(
        cc,
        64,
        64,
        64,
        64,
        MASK_NONE,
        False,
        np.float32,
        None,
        mod_args,
        score_mod=score_mod,
        score_grad=grad,
        mask_mod=mask_mod,
    )
    if name == "softcap":
        assert "tanh" in dkdv
    if mask_mod is not None:  # the block map is read: empty tiles are skipped
        assert re.search(r"ld\.global\.(u8|s8)", dkdv) and re.search(r"ld\.global\.(u8|s8)", dq)


def _exp_bias(score, b, h, q_idx, kv_idx):
    return score + np.exp(score * np.float32(0.5))


def test_complex_step_that_numba_cuda_cannot_compile_is_refused_by_name(current_device):
    """A score_mod without a declared derivative whose complex-step form has no GPU version (a NumPy
    ufunc on a complex number compiles on the CPU, not on the GPU): the backend's refusal reason
    (so ``auto`` falls back), found by compiling a probe; alibi's compiles."""
    from engine.backends.cuda.backward import complex_step_compile_error
    from variants.alibi import alibi_bias, alibi_slopes

    current_device((9, 0))
    why = complex_step_compile_error(_exp_bias, (), (9, 0))
    assert why and "_exp_bias declares no derivative" in why and "with_score_grad" in why
    assert complex_step_compile_error(alibi_bias, (alibi_slopes(4).astype(np.float32),), (9, 0)) is None
