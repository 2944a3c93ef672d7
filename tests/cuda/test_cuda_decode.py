"""What only the ``cuda`` backend's decoding has, against the ``reference`` oracle.

Decoding's behaviour (contiguous and paged caches, ragged lengths from empty to full, forced
splits, windows, mods, 16-bit caches, non-finite values, in-place writes) is specified once, for
every backend, in ``tests/decode/test_decoding.py``; the simulator run (``tests/simulator.py``)
runs it for cuda, with 16 threads, 4 query rows and 8 keys per block and pages of 3 slots that a
tile crosses. Here: 16-bit queries (float32 arithmetic, one rounding), a mod's array argument
copied to the device, the default tiles, the merge and write kernels line for line against their
host versions, the split and tile choice, the refusals, the validation of device caches, and, on
a real GPU only, torch CUDA caches written in place.

As ``test_cuda_forward.py``: these tests run under the simulator (the simulator run of
``test_simulator.py``) or on a real GPU, and skip in the ordinary run without one.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import engine
from engine.backends.cuda.decode import choose_num_splits, decode_shared_bytes, decode_tiles, run_decode, sm_count
from engine.problems.decode import validate_decode_args
from engine.runtime.config import CUDA_DECODE_DEFAULT_SMS

from decode_cases import close, make_case, paged
from simulator import SIM_DECODE_TILES as TINY
from simulator import SIMULATOR as SIM
from simulator import default_tiles
from testmods import table_bias

BF16 = np.dtype(ml_dtypes.bfloat16)
pytestmark = pytest.mark.simulator
GPU = not SIM and engine.get_backend("cuda").unavailable_reason() is None
HERE = SIM or GPU
needs_cuda = pytest.mark.skipif(not HERE, reason="no CUDA target here; run under the simulator by test_simulator.py")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a real CUDA GPU (device arrays)")


def copies(case):
    return dict(case, k_cache=case["k_cache"].copy(), v_cache=case["v_cache"].copy())


def cuda_run(case, tiles=TINY, **kwargs):
    """The cuda decode with small tiles on copies of the caches: (out, lse, k_cache, v_cache)."""
    c = copies(case)
    problem = validate_decode_args(**c, return_lse=True, **kwargs)
    assert not engine.get_backend("cuda").not_supported_reasons(problem)
    out, lse = run_decode(problem, **tiles)
    assert out.shape == problem.out_shape and lse.shape == problem.lse_shape
    assert out.dtype == problem.dtype and lse.dtype == problem.dtype
    return out, lse, c["k_cache"], c["v_cache"]


def oracle(case, **kwargs):
    c = copies(case)
    out, lse = engine.attention_with_kvcache(**c, backend="reference", return_lse=True, **kwargs)
    return out, lse, c["k_cache"], c["v_cache"]


def same_caches(got, want):
    """The caches are written exactly as the cpu/reference backends write them (bit for bit)."""
    for c in (2, 3):
        np.testing.assert_array_equal(got[c].view(np.uint8), want[c].view(np.uint8))


@needs_cuda
@pytest.mark.parametrize("q_dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_sixteen_bit_queries(rng, q_dtype):
    """16-bit queries are computed in float32; out and lse are rounded once to the query dtype."""
    case = make_case(rng, B=2, Hq=2, Hkv=1, L=2, L_new=2, S_max=12, q_dtype=q_dtype, cache_dtype=BF16, seqlens=[0, 10])
    got = cuda_run(case, num_splits=2)
    assert got[0].dtype == q_dtype and got[1].dtype == q_dtype
    want = oracle(case)
    unit = 2.0**-8 if q_dtype == BF16 else 2.0**-11
    for g, w in zip(got[:2], want[:2]):
        g, w = g.astype(np.float64), w.astype(np.float64)
        np.testing.assert_allclose(g, w, atol=2 * unit * max(1.0, np.abs(w).max()) + 1e-5)


@needs_cuda
def test_mod_with_an_array_argument(rng):
    case = make_case(rng, B=2, Hq=2, Hkv=2, L=1, L_new=1, S_max=14, seqlens=[3, 13])
    table = rng.standard_normal((2, 4)).astype(np.float32)
    got = cuda_run(case, num_splits=3, score_mod=table_bias, mod_args=(table,))
    close(got, oracle(case, score_mod=table_bias, mod_args=(table,)), case)


@needs_cuda
def test_public_api_with_default_tiles(rng):
    """Through ``engine.attention_with_kvcache``: 128 threads, tiles as on a GPU, split chosen."""
    case = make_case(rng, B=2, Hq=2, Hkv=1, L=1, L_new=1, D=8, Dv=8, S_max=70, seqlens=[0, 69])
    c = copies(case)
    with default_tiles():
        out, lse = engine.attention_with_kvcache(**c, backend="cuda", return_lse=True)
        got = engine.attention_with_kvcache(**copies(case), backend="cuda", num_splits=2, return_lse=True)
    want = oracle(case)
    close((out, lse), want, case)
    same_caches((out, lse, c["k_cache"], c["v_cache"]), want)
    close(got, want, case)


@needs_cuda
def test_merge_kernel_matches_merge_attention():
    """The device merge is ``lse_merge._merge_row`` line for line: empty parts, an all-empty row,
    NaN and +inf lse, an underflowed part with a non-finite output, and ordinary rows."""
    from numba import cuda

    from engine.kernels.cuda import decode as kd
    from engine.kernels.lse_merge import _merge_rows

    rng = np.random.default_rng(7)
    P, N, Ev = 3, 7, 5
    part_out = rng.standard_normal((P, N, Ev)).astype(np.float32)
    part_lse = rng.standard_normal((P, N)).astype(np.float32) * 3
    part_lse[:, 1] = -np.inf  # every part empty
    part_lse[0, 2] = -np.inf  # one empty part, its output garbage
    part_out[0, 2] = np.nan
    part_lse[1, 3] = np.nan
    part_lse[2, 4] = np.inf
    part_lse[:, 5] = (0.0, -200.0, 1.0)  # part 1 underflows to weight 0: its inf must not leak
    part_out[1, 5] = np.inf
    want_out = np.empty((N, Ev), np.float32)
    want_lse = np.empty(N, np.float32)
    _merge_rows(part_out, part_lse, want_out, want_lse)
    for kind, dtype in ((kd.CACHE_FLOAT32, np.float32), (kd.CACHE_FLOAT16, np.float16), (kd.CACHE_BFLOAT16, BF16)):
        store = np.uint16 if dtype == BF16 else dtype
        out = cuda.device_array((N, Ev), dtype=store)
        lse = cuda.device_array(N, dtype=store)
        kd.merge_kernel(kind)[(1,), 64](cuda.to_device(part_out), cuda.to_device(part_lse), out, lse)
        got_out, got_lse = out.copy_to_host(), lse.copy_to_host()
        if dtype == BF16:
            got_out, got_lse = got_out.view(BF16), got_lse.view(BF16)
        # the host merge rounded once to the output dtype (exp differs by an ulp of float32 at most)
        unit = {np.float32: 2.0**-22, np.float16: 2.0**-10, BF16: 2.0**-7}[dtype]
        for g, w in ((got_out, want_out), (got_lse, want_lse)):
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            np.testing.assert_array_equal(np.isnan(g64), np.isnan(w64))
            np.testing.assert_array_equal(np.isneginf(g64), np.isneginf(w64))
            fin = np.isfinite(w64)
            np.testing.assert_allclose(g64[fin], w64[fin], atol=unit * max(1.0, np.abs(w64[fin]).max()))
    assert np.all(want_out[1] == 0) and np.isneginf(want_lse[1])  # (the oracle's own behaviour)
    assert np.isnan(want_out[3]).all() and np.isnan(want_out[4]).all() and np.isfinite(want_out[5]).all()


@needs_cuda
@pytest.mark.parametrize("cache", [np.float32, np.float16, BF16], ids=["float32", "float16", "bfloat16"])
def test_device_write_kernel_writes_what_the_host_writes(rng, cache):
    """``_write_entries`` (for device caches) rounds float32 and float16 entries to the cache dtype
    as NumPy and ml_dtypes do on the host, through a page table (D != Dv), and touches no other
    slot: the caches' bytes equal the host write's."""
    from numba import cuda

    from engine.backends.kvcache import write_new_entries
    from engine.kernels.cuda import decode as kd

    case = paged(make_case(rng, B=3, Hq=2, Hkv=2, L=3, L_new=3, S_max=12, cache_dtype=cache, seqlens=[0, 4, 9]), 4, rng)
    # values that round differently at ties and across the exponent range
    case["key"][0, 0, 0, :4] = (1 + 2.0**-8, 1 + 3 * 2.0**-9, 70000.0, np.nan)
    bits = np.uint16 if cache == BF16 else cache
    kind = {np.dtype(np.float32): kd.CACHE_FLOAT32, np.dtype(np.float16): kd.CACHE_FLOAT16, BF16: kd.CACHE_BFLOAT16}[
        np.dtype(cache)
    ]
    seqlens = case["cache_seqlens"].astype(np.int64)
    d_k, d_v = (cuda.to_device(case[n].view(bits) if cache == BF16 else case[n]) for n in ("k_cache", "v_cache"))
    # keys float32, values float16: each converted on its own
    key, value = case["key"], case["value"].astype(np.float16)
    n = max(key.size, value.size)
    kd.write_kernel(kind, kd.CACHE_FLOAT32, kd.CACHE_FLOAT16)[(-(-n // 64),), 64](
        cuda.to_device(key),
        cuda.to_device(value),
        d_k,
        d_v,
        cuda.to_device(case["page_table"]),
        cuda.to_device(seqlens),
    )
    host = validate_decode_args(**dict(copies(case), value=value))
    write_new_entries(host)
    np.testing.assert_array_equal(d_k.copy_to_host().view(np.uint8), host.k_cache.view(np.uint8))
    np.testing.assert_array_equal(d_v.copy_to_host().view(np.uint8), host.v_cache.view(np.uint8))


# -- no CUDA target needed ---------------------------------------------------------------------


def test_split_choice_and_tiles():
    assert sm_count() == CUDA_DECODE_DEFAULT_SMS or GPU
    # 264 resident-block slots on 132 SMs: a batch of 1 x 8 cache heads at 32k keys splits
    # the best is 33 splits (all 264 slots); 29 (232 slots, 88%) is the smallest within 85% of it
    assert choose_num_splits(8, 32768, 132) == 29
    assert choose_num_splits(300, 32768, 132) == 1  # enough blocks already
    assert choose_num_splits(8, 600, 132) == 1  # too few keys to split (512 a split at least)
    rb, bk = decode_tiles(128, 128, 8)
    assert (rb, bk) == (8, 32) and decode_shared_bytes(128, 128, rb, bk) <= 44 * 1024
    assert decode_tiles(64, 64, 1) == (1, 64)  # MHA decode: one row a block, the longest tiles
    assert decode_tiles(64, 64, 40) == (8, 64)


def test_refusals_name_the_reason(rng):
    backend = engine.get_backend("cuda")
    p = validate_decode_args(**make_case(rng, q_dtype=np.float64, cache_dtype=np.float64))
    reasons = backend.not_supported_reasons(p)
    assert any("query dtype float64 not supported for decoding" in r for r in reasons)
    assert any("cache dtype float64 not supported" in r for r in reasons)
    p = validate_decode_args(**make_case(rng, D=1024, Dv=1024, S_max=4))
    assert any("shared memory" in r for r in backend.not_supported_reasons(p))
    case = make_case(rng, q_dtype=np.float64, cache_dtype=np.float64)
    before = case["k_cache"].copy()
    with pytest.raises(engine.NotSupportedError, match="float64"):
        engine.attention_with_kvcache(**case, backend="cuda")
    np.testing.assert_array_equal(case["k_cache"], before)


# -- device arrays: validation without a GPU, the kernels on a real GPU only ---------------------


class FakeDeviceArray:
    """Host memory behind a ``__cuda_array_interface__``: what validation sees of a device array
    (it reads the interface only; nothing here reaches a kernel)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        ai = arr.__array_interface__
        self.__cuda_array_interface__ = {
            "shape": ai["shape"],
            "typestr": ai["typestr"],
            "strides": ai["strides"],
            "data": ai["data"],
            "version": 3,
        }


def device_case(case):
    return {
        k: FakeDeviceArray(v) if k in ("query", "k_cache", "v_cache", "key", "value") else v for k, v in case.items()
    }


def test_device_caches_are_validated_without_reading_them(rng):
    case = paged(make_case(rng, B=2, L=1, L_new=1, S_max=16, seqlens=[3, 15]), 4, rng)
    problem = validate_decode_args(**device_case(case))
    assert problem.on_device and problem.paged and problem.k_cache is not case["k_cache"]
    for name in ("cpu", "reference"):  # host-only backends refuse, naming why
        reasons = engine.get_backend(name).not_supported_reasons(problem)
        assert any("device arrays" in r for r in reasons), reasons
    # every index check runs for device caches too, before anything is written
    bad = device_case(dict(case, cache_seqlens=np.array([3, 17], np.int32)))
    with pytest.raises(ValueError, match=r"page_table\[1, 4\] = -1 is not a page of the cache"):
        validate_decode_args(**bad)
    f64 = dict(device_case(case), key=FakeDeviceArray(case["key"].astype(np.float64)))
    reasons = engine.get_backend("cuda").not_supported_reasons(validate_decode_args(**f64))
    assert any("key of dtype float64 on the device" in r for r in reasons), reasons


DEVICE_ERRORS = [
    ("mixed", lambda c: dict(c, k_cache=c["k_cache"].arr), TypeError, "must all be host arrays or all device"),
    ("mixed-key", lambda c: dict(c, key=c["key"].arr), TypeError, "key must be a device array, as the caches"),
    (
        "device-seqlens",
        lambda c: dict(c, cache_seqlens=FakeDeviceArray(np.array([1, 2], np.int32))),
        TypeError,
        "cache_seqlens must be a host array",
    ),
    (
        "strided-cache",
        lambda c: dict(c, k_cache=FakeDeviceArray(np.zeros((2, 2, 16, 32), np.float32)[..., ::2])),
        ValueError,
        "k_cache must be C-contiguous",
    ),
    (
        "shared-caches",
        # v_cache: a C-contiguous window into k_cache's memory
        lambda c: (
            lambda k: dict(
                c, k_cache=FakeDeviceArray(k), v_cache=FakeDeviceArray(k.reshape(-1)[8:520].reshape(2, 2, 16, 8))
            )
        )(np.zeros((2, 2, 16, 16), np.float32)),
        ValueError,
        "must not share memory",
    ),
    (
        "read-only",
        lambda c: dict(
            c, k_cache=FakeDeviceArray((lambda a: (a.setflags(write=False), a)[1])(c["k_cache"].arr.copy()))
        ),
        ValueError,
        "k_cache is read-only",
    ),
]


@pytest.mark.parametrize("name, change, exc, words", DEVICE_ERRORS, ids=[e[0] for e in DEVICE_ERRORS])
def test_device_argument_errors(rng, name, change, exc, words):
    case = device_case(make_case(rng, B=2, Hq=4, Hkv=2, L=1, L_new=1, D=16, Dv=8, S_max=16, seqlens=[1, 2]))
    with pytest.raises(exc, match=words):
        validate_decode_args(**change(case))


def torch_cuda(case, torch):
    def conv(a):
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" and a.dtype != BF16:
            return a
        if a.dtype == BF16:
            return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16).cuda()
        return torch.from_numpy(a).cuda()

    return {k: conv(v) if k in ("query", "k_cache", "v_cache", "key", "value") else v for k, v in case.items()}


def to_numpy(t):
    import torch

    if t.dtype == torch.bfloat16:
        return t.cpu().view(torch.uint16).numpy().view(BF16)
    return t.cpu().numpy()


@needs_gpu
@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "pages4"])
@pytest.mark.parametrize("cache", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_torch_cuda_caches_written_in_place_on_the_device(rng, cache, page_size):
    """Device caches: written in place on the GPU (bit for bit as the host writes), attended there,
    the result a torch CUDA tensor of the query's dtype; the same numbers as the oracle."""
    torch = pytest.importorskip("torch")
    case = make_case(
        rng, B=3, Hq=8, Hkv=2, L=2, L_new=2, D=64, Dv=64, S_max=300, cache_dtype=cache, seqlens=[0, 77, 298]
    )
    if page_size:
        case = paged(case, page_size, rng)
    want = oracle(case)
    dev = torch_cuda(case, torch)
    for splits in (1, 5, None):
        d = dict(dev, k_cache=dev["k_cache"].clone(), v_cache=dev["v_cache"].clone())
        out, lse = engine.attention_with_kvcache(**d, return_lse=True, num_splits=splits)  # auto: cuda
        assert out.is_cuda and out.dtype == torch.float32
        got = (to_numpy(out), to_numpy(lse), to_numpy(d["k_cache"]), to_numpy(d["v_cache"]))
        close(got, want, case, f"[splits={splits}]")
        same_caches(got, want)


@needs_gpu
def test_torch_bfloat16_query_and_strided_query_on_the_device(rng):
    torch = pytest.importorskip("torch")
    case = make_case(rng, B=2, Hq=4, Hkv=2, L=1, L_new=1, D=32, Dv=32, S_max=100, cache_dtype=BF16, seqlens=[5, 90])
    want = oracle(case)
    dev = torch_cuda(case, torch)
    q = dev["query"].to(torch.bfloat16)
    out = engine.attention_with_kvcache(
        **dict(dev, query=q, k_cache=dev["k_cache"].clone(), v_cache=dev["v_cache"].clone())
    )
    assert out.dtype == torch.bfloat16
    np.testing.assert_allclose(to_numpy(out).astype(np.float32), want[0], atol=2e-2)
    # a transposed (non-contiguous) query is read in place
    qt = dev["query"].transpose(1, 2).contiguous().transpose(1, 2)
    out = engine.attention_with_kvcache(
        **dict(dev, query=qt, k_cache=dev["k_cache"].clone(), v_cache=dev["v_cache"].clone())
    )
    close((to_numpy(out), want[1]), want, case)
