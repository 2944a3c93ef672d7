"""``engine.attention_with_kvcache``: every backend that decodes against the ``reference`` oracle
(contiguous and paged caches, ragged lengths, GQA, windows, mods, 16-bit caches, split-KV), the
oracle itself against torch, the in-place writes, and the errors (raised before anything is
written).

The specification of decoding for every backend: under the CUDA simulator (``tests/simulator.py``)
the tests marked ``simulator`` run for ``cuda``, with caches of about 20 slots instead of 48 (its
tiles there: 4 query rows, 8 keys)."""

import numpy as np
import pytest

import engine
from engine.backends.kvcache import pick_num_splits

from conftest import available_backends
from decode_cases import close, make_case, paged
from simulator import SIMULATOR, simulated
from testmods import position_bias as score_mod
from testmods import stride_mask as mask_mod

kvcache = engine.attention_with_kvcache
DECODERS = [n for n in available_backends() if engine.get_backend(n).supports_decode]
FAST = [n for n in DECODERS if n != "reference"]


def run(case, backend, **kwargs):
    """Call on copies of the caches (the call writes into them); returns (out, lse, k_cache, v_cache)."""
    c = dict(case, k_cache=case["k_cache"].copy(), v_cache=case["v_cache"].copy())
    out, lse = kvcache(**c, backend=backend, return_lse=True, **kwargs)
    return out, lse, c["k_cache"], c["v_cache"]


# ---------------------------------------------------------------------------------------------
# the oracle against torch


def test_reference_matches_torch_per_sequence(rng):
    torch = pytest.importorskip("torch")
    case = make_case(rng, B=3, Hq=6, Hkv=2, L=3, L_new=3, seqlens=[0, 7, 20])
    for window, causal in (((-1, -1), True), ((4, -1), True), ((2, 1), False)):
        out, lse, kc, vc = run(case, "reference", window=window, is_causal=causal)
        for b, past in enumerate(case["cache_seqlens"]):
            S = past + 3
            k = torch.from_numpy(kc[b : b + 1, :, :S]).double()
            v = torch.from_numpy(vc[b : b + 1, :, :S]).double()
            q = torch.from_numpy(case["query"][b : b + 1]).double()
            i = torch.arange(3)[:, None] + S - 3  # FlashAttention's window, written out
            j = torch.arange(S)[None, :]
            mask = torch.ones(3, S, dtype=torch.bool)
            if causal:
                mask &= j <= i
            if window[0] >= 0:
                mask &= j >= i - window[0]
            if window[1] >= 0:
                mask &= j <= i + window[1]
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            np.testing.assert_allclose(out[b : b + 1], want.numpy(), atol=1e-6)
            scores = q @ k.repeat_interleave(3, 1).transpose(-1, -2) / 4.0
            want_lse = torch.logsumexp(torch.where(mask, scores, -torch.inf), -1)[0]
            np.testing.assert_allclose(lse[b], want_lse.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# every decoding backend against the oracle

LAYOUTS = [None, 4, 16]  # contiguous; pages smaller than a tile (gathered); pages holding whole tiles
# under the simulator: pages of 3 (a key tile of 8 crosses them unaligned) or 16 (whole tiles)
SIM_LAYOUTS = [None, 3, 16]
CASES = {
    "decode": dict(L=1, L_new=1),
    "prefill-chunk": dict(L=5, L_new=5),
    "no-new-entries": dict(L=2, L_new=0),
    "mqa-more-queries-than-new": dict(Hq=4, Hkv=1, L=3, L_new=1),
}


def sim_sized(backend, L_new, S_max=22):
    """The simulator's smaller caches for ``backend``: three sequences, fresh, half full and full
    after the write (empty for other backends: their sizes and random lengths stay)."""
    return dict(S_max=S_max, seqlens=[0, 9, S_max - L_new]) if simulated(backend) else {}


@pytest.mark.simulator
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", range(3), ids=["contiguous", "small-pages", "pages16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_matches_reference(rng, backend, layout, name):
    case = make_case(rng, **CASES[name], **sim_sized(backend, CASES[name]["L_new"]))
    page_size = (SIM_LAYOUTS if simulated(backend) else LAYOUTS)[layout]
    if page_size:
        case = paged(case, page_size, rng)
    want = run(case, "reference")
    # (the simulator's caches are below the split heuristic's threshold: None runs one split
    # there, so 1 would repeat it at seconds a launch)
    for splits in (3, None) if simulated(backend) else (1, 3, None):
        got = run(case, backend, num_splits=splits)
        close(got, want, case, f"[splits={splits}]")
        for c in (2, 3):  # the writes are the same too (bit for bit)
            np.testing.assert_array_equal(got[c], want[c])


@pytest.mark.simulator
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    "window, causal",
    [((6, -1), True), ((0, -1), True), ((0, 0), True), ((3, 1), False), ((-1, 2), False), ((2, 0), False)]
    + [((-1, -1), False)],
)
def test_windows(rng, backend, window, causal):
    # 6 query rows: the first ones lie more than `right` keys before the end (right bound matters)
    case = make_case(rng, L=6, L_new=2, **(dict(S_max=40) | sim_sized(backend, 2, S_max=30)))
    want = run(case, "reference", window=window, is_causal=causal)
    close(run(case, backend, window=window, is_causal=causal, num_splits=2), want, case)


@pytest.mark.simulator
def test_paged_equals_contiguous(rng):
    n = 24 if SIMULATOR else 64
    case = make_case(rng, B=4, L=2, L_new=2, S_max=n)
    for backend in DECODERS:
        flat = run(case, backend)
        for page_size in (1, 8, n):
            close(run(paged(case, page_size, rng), backend), flat, case, f"[{backend}, pages {page_size}]")


@pytest.mark.parametrize("backend", FAST)
def test_long_ragged_batch_with_splits(rng, backend):
    """Sequences from empty to several key tiles long; forced splits larger than some sequences."""
    case = make_case(rng, B=4, Hq=8, Hkv=2, L=1, L_new=1, D=32, Dv=32, S_max=700, seqlens=[0, 5, 300, 698])
    want = run(case, "reference")
    for splits in (1, 2, 7, None):
        close(run(case, backend, num_splits=splits), want, case, f"[splits={splits}]")


@pytest.mark.simulator
@pytest.mark.parametrize("page_size", [None, 4])
def test_in_place_writes(rng, page_size):
    """key/value land at cache_seqlens[b] ... + L_new - 1 of each sequence, nothing else changes,
    and the caller's cache_seqlens is left alone (the caller advances it)."""
    case = make_case(rng, B=3, L=2, L_new=2, S_max=16, seqlens=[0, 5, 14])
    want_k, want_v = case["k_cache"].copy(), case["v_cache"].copy()
    for b, s in enumerate(case["cache_seqlens"]):
        want_k[b, :, s : s + 2] = case["key"][b]
        want_v[b, :, s : s + 2] = case["value"][b]
    if page_size:
        case = paged(case, page_size, rng)
    seqlens = case["cache_seqlens"].copy()
    for backend in DECODERS:
        _, _, kc, vc = run(case, backend)
        if page_size:  # read the pages back into the contiguous layout
            t = np.arange(16)
            pages = case["page_table"][:, t // page_size]
            kc = np.swapaxes(kc[pages, :, t % page_size], 1, 2)
            vc = np.swapaxes(vc[pages, :, t % page_size], 1, 2)
        np.testing.assert_array_equal(kc, want_k)
        np.testing.assert_array_equal(vc, want_v)
        np.testing.assert_array_equal(case["cache_seqlens"], seqlens)


@pytest.mark.simulator
def test_rows_that_see_nothing_give_zeros(rng):
    case = make_case(rng, B=2, L=4, L_new=1, S_max=22 if SIMULATOR else 48, seqlens=[0, 1])  # sequence 0: 1 key
    for backend in DECODERS:
        out, lse, _, _ = run(case, backend)
        assert np.all(out[0, :, :3] == 0) and np.all(np.isneginf(lse[0, :, :3]))
        assert np.all(np.isfinite(lse[0, :, 3])) and np.all(np.isfinite(lse[1, :, 2:]))


# ---------------------------------------------------------------------------------------------
# 16-bit caches and other dtypes


@pytest.mark.simulator
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("cache", ["float16", "bfloat16"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_sixteen_bit_caches(rng, backend, cache, page_size):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.float16 if cache == "float16" else ml_dtypes.bfloat16
    case = make_case(rng, L=2, L_new=2, cache_dtype=dtype, **sim_sized(backend, 2))
    if page_size:
        case = paged(case, page_size, rng)
    want = run(case, "reference")
    got = run(case, backend, num_splits=2)
    assert got[0].dtype == np.float32 and got[2].dtype == dtype
    close(got, want, case)
    # the new entries were rounded to the cache dtype exactly as NumPy/ml_dtypes round
    np.testing.assert_array_equal(got[2].view(np.uint16), want[2].view(np.uint16))
    if page_size is None:
        B = case["query"].shape[0]
        for b in range(B):
            s = case["cache_seqlens"][b]
            np.testing.assert_array_equal(
                got[2][b, :, s : s + 2].view(np.uint16), case["key"][b].astype(dtype).view(np.uint16)
            )


@pytest.mark.simulator
@pytest.mark.parametrize("backend", FAST)
def test_sixteen_bit_queries_and_float64(rng, backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    sized = sim_sized(backend, 2)
    case = make_case(rng, L=2, L_new=2, q_dtype=ml_dtypes.bfloat16, cache_dtype=ml_dtypes.bfloat16, **sized)
    got = run(case, backend)
    assert got[0].dtype == ml_dtypes.bfloat16 and got[1].dtype == ml_dtypes.bfloat16
    want = run(case, "reference")
    np.testing.assert_allclose(got[0].astype(np.float32), want[0].astype(np.float32), atol=1e-2)
    if "float64" not in engine.get_backend(backend).capabilities()["ops"]["DecodeProblem"]["dtypes"]:
        return  # (cuda refuses float64 by name: tests/cuda/test_cuda_decode.py)
    case = make_case(rng, L=2, L_new=2, q_dtype=np.float64, cache_dtype=np.float64)
    got, want = run(case, backend), run(case, "reference")
    assert got[0].dtype == np.float64
    np.testing.assert_allclose(got[0], want[0], atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# mods, non-finite values


@pytest.mark.simulator
def test_mods_see_absolute_positions(rng):
    case = make_case(rng, L=3, L_new=3, S_max=40)
    # the oracle: mask_mod as the equivalent dense rule, score_mod's bias written out
    for backend in DECODERS:
        got = run(case, backend, score_mod=score_mod, mask_mod=mask_mod, mod_args=(4,), num_splits=2)
        want = run(case, "reference", score_mod=score_mod, mask_mod=mask_mod, mod_args=(4,))
        close(got, want, case, f"[{backend}]")
    # and the oracle against the mods applied by hand on one sequence
    out, _, kc, vc = run(case, "reference", score_mod=score_mod, mask_mod=mask_mod, mod_args=(4,))
    b = 1
    S = case["cache_seqlens"][b] + 3
    q = case["query"][b].astype(np.float64)
    k = np.repeat(kc[b, :, :S].astype(np.float64), 2, axis=0)
    v = np.repeat(vc[b, :, :S].astype(np.float64), 2, axis=0)
    i = (S - 3 + np.arange(3))[:, None]
    j = np.arange(S)[None, :]
    h = np.arange(4)[:, None, None]
    s = q @ np.swapaxes(k, -1, -2) / 4.0 + 0.05 * (j - i) * (h + 1) - 0.3 * b
    s = np.where((j <= i) & ((i - j) % 4 != 1), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out[b], (p / p.sum(-1, keepdims=True)) @ v, atol=1e-6)


@pytest.mark.simulator
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("extra_rows", [0, 3], ids=["few-rows", "many-rows"])  # cpu: in-kernel loops; BLAS tiles
def test_nonfinite_values_reach_only_rows_that_attend_them(rng, backend, extra_rows):
    case = make_case(rng, B=2, L=3 + extra_rows, L_new=3, S_max=40, seqlens=[20, 30])
    case["v_cache"][0, 1, 5, 2] = np.nan  # hidden from every row by the window below
    case["value"][1, 0, 1, 0] = np.inf  # written at 31: seen by sequence 1's last two rows only
    got = run(case, backend, window=(10, -1), num_splits=2)
    want = run(case, "reference", window=(10, -1))
    close(got, want, case)
    e = extra_rows  # (the extra rows come first: bottom-right alignment)
    assert np.isfinite(got[0][0]).all()
    assert np.isinf(got[0][1, :2, e + 1 :, 0]).all() and np.isfinite(got[0][1, :2, : e + 1]).all()
    case["k_cache"][1, 1, 3, 0] = np.nan  # a NaN score: the rows that see it are NaN
    got = run(case, backend)
    assert np.isnan(got[0][1, 2:]).all() and not np.isnan(got[0][1, :2]).any()


# ---------------------------------------------------------------------------------------------
# split-KV choice, refusals


def test_pick_num_splits():
    assert pick_num_splits(tasks=8, max_keys=32768, threads=2) == 1  # every thread busy
    assert pick_num_splits(tasks=1, max_keys=100, threads=16) == 1  # too few keys to split
    assert pick_num_splits(tasks=2, max_keys=32768, threads=16) == 7  # 14 of 16 threads: >= 85%
    assert pick_num_splits(tasks=1, max_keys=1100, threads=16) == 2  # >= 512 keys a split
    assert pick_num_splits(tasks=3, max_keys=32768, threads=4) == 4  # 12 tasks on 4 threads


def test_backends_without_decoding_refuse_clearly(rng):
    from engine.problems.decode import validate_decode_args

    problem = validate_decode_args(**make_case(rng))
    for name in engine.list_backends():
        backend = engine.get_backend(name)
        reasons = backend.not_supported_reasons(problem)
        assert bool(reasons) != backend.supports_decode or backend.unavailable_reason()
        if not backend.supports_decode:
            assert any("KV-cache decoding" in r for r in reasons)
            case = make_case(rng)
            before = case["k_cache"].copy()
            with pytest.raises(engine.NotSupportedError, match="KV-cache decoding"):
                kvcache(**case, backend=name)
            np.testing.assert_array_equal(case["k_cache"], before)


# ---------------------------------------------------------------------------------------------
# errors: raised before anything is written


def _bad(rng, **changes):
    case = make_case(rng, B=2, Hq=4, Hkv=2, L=2, L_new=2, S_max=16, seqlens=[3, 14])
    case.update(changes)
    return case


def _swapped(case, name):
    """``case`` with its cache ``name`` in big-endian byte order (the same values)."""
    case[name] = case[name].astype(case[name].dtype.newbyteorder(">"))
    return case


def _unaligned(case, name):
    """``case`` with its cache ``name`` moved to an address one byte off its alignment."""
    a = case[name]
    buf = np.zeros(a.nbytes + 1, np.uint8)
    moved = np.frombuffer(buf.data, a.dtype, a.size, offset=1).reshape(a.shape)
    moved[...] = a
    case[name] = moved
    return case


def _paged_bad(rng, table, seqlens=(3, 9)):
    case = paged(make_case(rng, B=2, Hq=4, Hkv=2, L=1, L_new=1, S_max=16, seqlens=seqlens), 4, rng)
    case["page_table"] = np.asarray(table, np.int32)
    return case


ERRORS = [
    (
        "overflow",
        lambda rng: _bad(rng, cache_seqlens=np.array([3, 15], np.int32)),
        ValueError,
        r"writing 2 new keys at cache_seqlens\[1\] = 15 needs 17 slots, but the cache holds 16 per sequence",
    ),
    (
        "overflow-no-write",
        lambda rng: _bad(rng, cache_seqlens=np.array([3, 17], np.int32), key=None, value=None),
        ValueError,
        r"cache_seqlens\[1\] = 17, but the cache holds 16 per sequence",
    ),
    (
        "negative-seqlen",
        lambda rng: _bad(rng, cache_seqlens=np.array([-1, 2], np.int32)),
        ValueError,
        r"cache_seqlens must be >= 0, got cache_seqlens\[0\] = -1",
    ),
    (
        "seqlens-shape",
        lambda rng: _bad(rng, cache_seqlens=np.array([1, 2, 3], np.int32)),
        ValueError,
        r"cache_seqlens must have shape \(B,\) = \(2,\), got \(3,\)",
    ),
    (
        "seqlens-float",
        lambda rng: _bad(rng, cache_seqlens=np.array([1.0, 2.0])),
        TypeError,
        r"cache_seqlens must hold integers",
    ),
    (
        "page-out-of-range",
        lambda rng: _paged_bad(rng, [[0, 1, 2, 3, -1, -1], [4, 5, 99, 7, -1, -1]]),
        ValueError,
        r"page_table\[1, 2\] = 99 is not a page of the cache \(0\.\.10\); sequence 1 uses its first 3 pages",
    ),
    (
        "page-negative",
        lambda rng: _paged_bad(rng, [[-1, 1, 2, 3, 0, 0], [4, 5, 6, 7, 0, 0]]),
        ValueError,
        r"page_table\[0, 0\] = -1 is not a page",
    ),
    (
        "shared-write-slot",
        lambda rng: _paged_bad(rng, [[0, 1, 2, 3, 0, 0], [4, 5, 0, 7, 0, 0]], (1, 9)),
        ValueError,
        r"sequences \[0, 1\] would write the same cache slot \(page 0, offset 1\)",
    ),
    (
        "page-table-shape",
        lambda rng: _paged_bad(rng, [[0, 1, 2, 3]]),
        ValueError,
        r"page_table must have shape \(B, max_pages\) = \(2, \.\.\.\), got \(1, 4\)",
    ),
    ("key-without-value", lambda rng: _bad(rng, value=None), ValueError, r"pass key and value together"),
    (
        "key-shape",
        lambda rng: _bad(rng, key=np.zeros((2, 4, 2, 16), np.float32)),
        ValueError,
        r"key must have shape \(B, Hkv, L_new, D\) = \(2, 2, L_new, 16\), got \(2, 4, 2, 16\)",
    ),
    (
        "key-dtype",
        lambda rng: _bad(rng, key=np.zeros((2, 2, 2, 16), np.int64)),
        TypeError,
        r"key must have a floating dtype \(it is converted to the cache's float32\), got int64",
    ),
    (
        "heads-not-dividing",
        lambda rng: _bad(rng, query=np.zeros((2, 3, 2, 16), np.float32)),
        ValueError,
        r"must divide the query's .* got 3 query heads and 2 cache heads",
    ),
    (
        "head-size",
        lambda rng: _bad(rng, query=np.zeros((2, 4, 2, 8), np.float32)),
        ValueError,
        r"query and k_cache must have the same head size D",
    ),
    (
        "cache-dtype",
        lambda rng: _bad(rng, k_cache=np.zeros((2, 2, 16, 16)), v_cache=np.zeros((2, 2, 16, 8))),
        TypeError,
        r"the caches must be float16, bfloat16 or the compute dtype float32",
    ),
    (
        "int-query",
        lambda rng: _bad(rng, query=np.zeros((2, 4, 2, 16), np.int32)),
        TypeError,
        r"query must have a floating dtype",
    ),
    (
        "non-contiguous-cache",
        lambda rng: _bad(rng, k_cache=np.zeros((2, 2, 16, 32), np.float32)[..., ::2]),
        ValueError,
        r"k_cache must be C-contiguous \(it is written and read in place",
    ),
    (
        "shared-caches",
        lambda rng: (lambda c: _bad(rng, k_cache=c, v_cache=c))(np.zeros((2, 2, 16, 16), np.float32)),
        ValueError,
        r"k_cache and v_cache must not share memory",
    ),
    (
        "read-only-cache",
        lambda rng: (lambda c: (c.setflags(write=False), _bad(rng, k_cache=c))[1])(
            np.zeros((2, 2, 16, 16), np.float32)
        ),
        ValueError,
        r"k_cache is read-only",
    ),
    (
        "contiguous-batch",
        lambda rng: _bad(
            rng, k_cache=np.zeros((3, 2, 16, 16), np.float32), v_cache=np.zeros((3, 2, 16, 8), np.float32)
        ),
        ValueError,
        r"a contiguous k_cache must have the query's batch size 2 first",
    ),
    (
        "k_cache-byte-order",  # was read through a native copy, and the write went to the copy
        lambda rng: _swapped(_bad(rng), "k_cache"),
        ValueError,
        r"k_cache must be an array the new entries can be written into, got a byte order '>' array",
    ),
    (
        "v_cache-unaligned",  # the same with an unaligned one, after k_cache was written
        lambda rng: _unaligned(_bad(rng), "v_cache"),
        ValueError,
        r"v_cache must be an array the new entries can be written into, got an unaligned array",
    ),
    ("window", lambda rng: _bad(rng, window=(3,)), TypeError, r"window must be None or a pair"),
    ("window-value", lambda rng: _bad(rng, window=(-2, 0)), ValueError, r"window left must be an int >= 0"),
    ("num-splits", lambda rng: _bad(rng, num_splits=0), ValueError, r"num_splits must be >= 1, got 0"),
    (
        "rank",
        lambda rng: _bad(rng, query=np.zeros((4, 2, 16), np.float32)),
        ValueError,
        r"query must have 4 dimensions, got shape \(4, 2, 16\)",
    ),
]


@pytest.mark.parametrize("name, make, exc, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_write_nothing(rng, name, make, exc, words):
    case = make(rng)  # where the first sequence fits, it must not have been written either
    before = {n: np.array(case[n], copy=True) for n in ("k_cache", "v_cache")}
    with pytest.raises(exc, match=words):
        kvcache(**case)
    for n, a in before.items():
        np.testing.assert_array_equal(case[n], a, err_msg=f"{n} was written by a failing call")


def test_num_splits_above_flash_attentions_limit_is_refused_by_name(rng):
    case = make_case(rng)
    with pytest.raises(ValueError, match=r"num_splits must be <= 128 \(FlashAttention's limit\), got 129"):
        kvcache(**case, num_splits=129)
    with pytest.raises(ValueError, match=r"num_splits must be <= 128"):
        kvcache(**case, num_splits=10**12)


@pytest.mark.simulator
@pytest.mark.parametrize("backend", FAST)
def test_more_splits_than_keys_gives_the_one_split_result(rng, backend):
    """128 splits of caches of at most 6 keys: no empty split is allocated or merged."""
    case = make_case(rng, B=2, S_max=8, seqlens=[0, 5])
    want = kvcache(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.items()}, num_splits=1)
    got = kvcache(**case, num_splits=128, backend=backend)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _untypable(score, b, h, q_idx, kv_idx):
    return score + q_idx.bit_length()  # Numba has no int.bit_length (and fails without a warning)


def _raising(score, b, h, q_idx, kv_idx):
    raise RuntimeError("a mod that fails while running")


@pytest.mark.parametrize("backend", DECODERS)
def test_a_call_that_fails_after_the_write_leaves_the_caches_as_they_were(rng, backend):
    """The new entries are written before attending; when attending fails (here a score_mod the
    cpu kernel cannot compile, or one the oracle's Python call raises in), the written slots get
    their old contents back (contiguous and paged caches)."""
    from numba.core.errors import TypingError

    mod, error = (_raising, RuntimeError) if backend == "reference" else (_untypable, TypingError)
    for case in (make_case(rng), paged(make_case(rng), 8, rng)):
        before = case["k_cache"].copy(), case["v_cache"].copy()
        with pytest.raises(error):
            kvcache(**case, score_mod=mod, backend=backend)
        np.testing.assert_array_equal(case["k_cache"], before[0])
        np.testing.assert_array_equal(case["v_cache"], before[1])
        # and the same call without the failing mod writes them
        kvcache(**case, backend=backend)
        assert not np.array_equal(case["k_cache"], before[0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_new_entries_that_are_views_of_the_caches_are_written_as_they_were(rng, backend):
    """key/value views of the slots the call writes (or of the other cache): each slot gets what
    the entry held before the call, as NumPy's assignment; the cpu write went slot by slot and
    read an entry after an earlier slot of the same call had overwritten it."""
    kc = rng.standard_normal((1, 2, 16, 4)).astype(np.float32)
    vc = rng.standard_normal((1, 2, 16, 4)).astype(np.float32)
    q = rng.standard_normal((1, 2, 2, 4)).astype(np.float32)
    want_k, want_v = kc.copy(), vc.copy()
    want_k[:, :, 4:6] = kc[:, :, 3:5]  # key: slots 3-4 of k_cache, written to 4-5
    want_v[:, :, 4:6] = kc[:, :, 4:6]  # value: the k_cache slots the key overwrites
    want_out = kvcache(q, want_k.copy(), want_v.copy(), cache_seqlens=6, backend="reference")
    for _ in range(2):  # the second call runs on the plan
        k, v = kc.copy(), vc.copy()
        out = kvcache(q, k, v, k[:, :, 3:5], k[:, :, 4:6], cache_seqlens=4, backend=backend)
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)
        np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_new_entries_in_another_layout_inside_a_cache_through_the_plan(rng, backend):
    """A key that is an F-ordered view of v_cache's unused slots: the cached call's write got
    C-ordered copies into an entry point compiled for the F-ordered view, and wrote them permuted."""
    from numpy.lib.stride_tricks import as_strided

    kc = rng.standard_normal((2, 2, 16, 8)).astype(np.float32)
    vc = rng.standard_normal((2, 2, 16, 8)).astype(np.float32)
    q = rng.standard_normal((2, 4, 2, 8)).astype(np.float32)
    value = rng.standard_normal((2, 2, 2, 8)).astype(np.float32)
    seqlens = np.array([4, 6], np.int32)
    for _ in range(3):  # the second and third calls run on the plan
        k, v = kc.copy(), vc.copy()
        key = as_strided(v[1, 1, 8:].reshape(-1), (2, 2, 2, 8), (4, 8, 16, 32))  # F-contiguous
        assert key.flags.f_contiguous and np.may_share_memory(key, v)
        want_k = k.copy()
        want_k[0, :, 4:6], want_k[1, :, 6:8] = key[0], key[1]
        kvcache(q, k, v, key, value, cache_seqlens=seqlens, backend=backend)
        np.testing.assert_array_equal(k, want_k)
