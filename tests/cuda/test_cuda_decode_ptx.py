"""Every specialisation of the ``cuda`` decoding kernels compiles to PTX for compute capability 9.0
(H100/H200), and for the others ``ATTENTION_ENGINE_PTX_CCS`` names (as 8.0, the A100).

As ``test_cuda_ptx.py``: ``numba.cuda.compile_ptx`` types and lowers the kernels as a launch would,
without a GPU, and catches typing errors the simulator cannot see. It needs NVVM and NVRTC (the
``numba-cuda[cu13]`` wheels); without them these tests fail, they do not skip. Checked in the PTX:
no ``call`` left (the bfloat16 conversions, libdevice's exp/log and the mods are inlined), no
float64 arithmetic (the inputs are 32-bit or less; the scale arrives as a float64 parameter and is
converted once), 16-bit caches read with 16-bit loads and widened in registers, and the static
shared memory is what ``decode_shared_bytes`` says and at most 48 KiB.
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

from engine.backends.cuda.decode import decode_shared_bytes, decode_tiles
from engine.kernels.cuda import decode as kd
from engine.runtime.config import CUDA_DECODE_THREADS

from ptx_targets import PTX_CCS, cc_id  # noqa: E402

KINDS = {"float32": kd.CACHE_FLOAT32, "float16": kd.CACHE_FLOAT16, "bfloat16": kd.CACHE_BFLOAT16}
F64_ARITHMETIC = re.compile(r"\b(add|sub|mul|div\.rn|fma\.rn|neg|abs|min|max|ex2\.approx)\.f64\b")
CALL = re.compile(r"^\s*call(\.uni)?\b", re.M)


@pytest.fixture
def current_device(monkeypatch, request):
    """Numba compiles device functions (the bfloat16 conversions, the mods) for the *current*
    device even inside ``compile_ptx``; with no GPU here, the current device is said to have the
    compute capability being compiled for."""
    from numba.cuda import dispatcher

    cc = request.param

    if not cuda.is_available():
        monkeypatch.setattr(dispatcher, "get_current_device", lambda: types.SimpleNamespace(compute_capability=cc))
    return cc


def shared(ptx: str) -> int:
    return sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]", ptx))


def check_common(ptx: str, cc, entry: str):
    assert re.search(rf"^\.target sm_{cc[0]}{cc[1]}\b", ptx, re.M)
    assert re.search(rf"^\.visible \.entry \S*{entry}", ptx, re.M)
    assert not CALL.search(ptx), "a call is left in the PTX"
    assert not F64_ARITHMETIC.search(ptx), "float64 arithmetic in the PTX"


# (E, Ev, rows = group x L): the backend's own tiles for common heads (one row: MHA decode; 8 rows or
# more: GQA groups and prefill chunks, which share a specialisation),
# plus the simulator tests' tiny heads
HEADS = [(64, 64, 1), (128, 128, 8), (8, 5, 2)]


@pytest.mark.parametrize("current_device", PTX_CCS, indirect=True, ids=cc_id)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"E{h[0]}-Ev{h[1]}-rows{h[2]}")
@pytest.mark.parametrize("cache", list(KINDS))
def test_decode_kernel_compiles(current_device, cache, heads):
    E, Ev, rows = heads
    kind = KINDS[cache]
    rb, bk = decode_tiles(E, Ev, rows)
    fn = kd.decode_kernel_source(E, Ev, rb, bk, CUDA_DECODE_THREADS, kind)
    ptx, restype = cuda.compile_ptx(fn, kd.decode_signature(kind), cc=current_device)
    assert str(restype) == "none"
    check_common(ptx, current_device, "_decode_split")
    assert shared(ptx) == decode_shared_bytes(E, Ev, rb, bk) <= kd.SHARED_LIMIT
    if kind == kd.CACHE_FLOAT32:
        assert not re.search(r"ld\.global\.(u16|b16)", ptx)
    else:  # 16-bit cache entries, widened in registers
        assert re.search(r"ld\.global\.(u16|b16)", ptx)
    # float16: the hardware conversion; bfloat16: a shift (no float16 conversion at all)
    assert ("cvt.f32.f16" in ptx) == (kind == kd.CACHE_FLOAT16)
    assert "ex2.approx" in ptx  # libdevice's expf


# both mods get every mod_arg, as in the API
def local_window(b, h, q_idx, kv_idx, slopes):
    return q_idx - kv_idx < 128


@pytest.mark.parametrize("current_device", PTX_CCS, indirect=True, ids=cc_id)
@pytest.mark.parametrize("cache", ["float32", "bfloat16"])
def test_decode_kernel_with_mods_compiles(current_device, cache):
    import numba
    from numba import typeof

    from variants.alibi import alibi_bias, alibi_slopes

    kind = KINDS[cache]
    mod_args = (alibi_slopes(8).astype(np.float32),)  # float32 slopes keep ALiBi's bias float32
    # a plain function and a numba.njit one (its .py_func becomes the device function)
    fn = kd.decode_kernel_source(128, 128, 8, 32, CUDA_DECODE_THREADS, kind, alibi_bias, numba.njit(local_window))
    sig = list(kd.decode_signature(kind))
    sig[11] = numba.types.Tuple(tuple(typeof(a) for a in mod_args))
    ptx, _ = cuda.compile_ptx(fn, tuple(sig), cc=current_device)
    check_common(ptx, current_device, "_decode_split")
    assert shared(ptx) == decode_shared_bytes(128, 128, 8, 32)


@pytest.mark.parametrize("current_device", PTX_CCS, indirect=True, ids=cc_id)
@pytest.mark.parametrize("out", list(KINDS))
def test_merge_kernel_compiles(current_device, out):
    kind = KINDS[out]
    ptx, restype = cuda.compile_ptx(kd.merge_kernel_source(kind), kd.merge_signature(kind), cc=current_device)
    assert str(restype) == "none"
    check_common(ptx, current_device, "_merge_splits")
    assert shared(ptx) == 0
    assert "ex2.approx" in ptx  # libdevice's expf (its logf is a polynomial: no instruction to find)
    if kind != kd.CACHE_FLOAT32:
        assert re.search(r"st\.global\.(u16|b16)", ptx)


@pytest.mark.parametrize("current_device", PTX_CCS, indirect=True, ids=cc_id)
@pytest.mark.parametrize("new", list(KINDS))
@pytest.mark.parametrize("cache", list(KINDS))
def test_write_kernel_compiles(current_device, cache, new):
    ck, nk = KINDS[cache], KINDS[new]
    ptx, restype = cuda.compile_ptx(
        kd.write_kernel_source(ck, nk, nk), kd.write_signature(ck, nk, nk), cc=current_device
    )
    assert str(restype) == "none"
    check_common(ptx, current_device, "_write_entries")
    if ck != kd.CACHE_FLOAT32:
        assert re.search(r"st\.global\.(u16|b16)", ptx)


@pytest.mark.parametrize("current_device", PTX_CCS, indirect=True, ids=cc_id)
@pytest.mark.parametrize("query", list(KINDS))
def test_decode_kernel_for_device_queries_compiles(current_device, query):
    """Device calls read the caller's query in place: any strides, float32/float16/bfloat16."""
    qk = KINDS[query]
    kind = kd.CACHE_BFLOAT16
    rb, bk = decode_tiles(128, 128, 4)
    fn = kd.decode_kernel_source(128, 128, rb, bk, CUDA_DECODE_THREADS, kind, q_kind=qk)
    ptx, _ = cuda.compile_ptx(fn, kd.decode_signature(kind, q_kind=qk, q_strided=True), cc=current_device)
    check_common(ptx, current_device, "_decode_split")
    assert shared(ptx) == decode_shared_bytes(128, 128, rb, bk)
    assert ("cvt.f32.f16" in ptx) == (qk == kd.CACHE_FLOAT16)


@pytest.mark.parametrize("current_device", PTX_CCS, indirect=True, ids=cc_id)
def test_write_kernel_for_strided_device_entries_compiles(current_device):
    """Keys and values of different dtypes, strided, into a bfloat16 cache."""
    ck, kk, vk = kd.CACHE_BFLOAT16, kd.CACHE_FLOAT32, kd.CACHE_FLOAT16
    sig = kd.write_signature(ck, kk, vk, strided=True)
    ptx, _ = cuda.compile_ptx(kd.write_kernel_source(ck, kk, vk), sig, cc=current_device)
    check_common(ptx, current_device, "_write_entries")
