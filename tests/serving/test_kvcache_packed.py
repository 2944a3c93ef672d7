"""``attention_with_kvcache(..., cu_seqlens_q=)``: decode steps and prefill chunks of different
lengths mixed in one call. Every backend that takes packed queries against the float64 eager
oracle on the written caches (contiguous and paged, GQA, windows, mods at absolute positions,
sinks, 16-bit caches, split-KV, no new entries), the slots written, the equality with the separate
calls it replaces, and the all-or-nothing rule (errors before any write, restore on failure)."""

import numpy as np
import pytest
import torch

import engine
from engine.problems.decode import DecodeProblem, validate_decode_args

from conftest import available_backends, randn
from eager_oracle import bottom_right, eager
from tolerances import assert_out_close, lse_atol, out_atol

kvcache = engine.attention_with_kvcache
PACKED = [
    n for n in available_backends() if getattr(engine.get_backend(n).op(DecodeProblem), "supports_cu_seqlens_q", False)
]


def offsets(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def make(rng, lens, seqlens, Hq=4, Hkv=2, D=16, Dv=8, S_max=64, cache_dtype=np.float32, new=True):
    """Packed queries (and new keys/values when ``new``) for sequences with ``lens`` new tokens
    and ``seqlens`` entries already cached; caches filled with random entries everywhere."""
    cu = offsets(lens)
    B = len(lens)
    return dict(
        query=randn(rng, (cu[-1], Hq, D)),
        k_cache=randn(rng, (B, Hkv, S_max, D)).astype(cache_dtype),
        v_cache=randn(rng, (B, Hkv, S_max, Dv)).astype(cache_dtype),
        key=randn(rng, (cu[-1], Hkv, D)) if new else None,
        value=randn(rng, (cu[-1], Hkv, Dv)) if new else None,
        cache_seqlens=np.asarray(seqlens, np.int32),
        cu_seqlens_q=cu,
    )


def paged(case, page_size, rng):
    """The case's caches cut into shuffled pages, with a page table padded by -1."""
    kc, vc = case["k_cache"], case["v_cache"]
    B, Hkv, S_max, _ = kc.shape
    per = -(-S_max // page_size)
    order = rng.permutation(B * per + 2)[: B * per].reshape(B, per).astype(np.int32)
    kp = np.full((B * per + 2, Hkv, page_size, kc.shape[3]), np.nan, kc.dtype)
    vp = np.full((B * per + 2, Hkv, page_size, vc.shape[3]), np.nan, vc.dtype)
    for b in range(B):
        for t in range(S_max):
            kp[order[b, t // page_size], :, t % page_size] = kc[b, :, t]
            vp[order[b, t // page_size], :, t % page_size] = vc[b, :, t]
    table = np.full((B, per + 1), -1, np.int32)
    table[:, :per] = order
    return dict(case, k_cache=kp, v_cache=vp, page_table=table)


def sequence_cache(case, k_cache, v_cache, b, S):
    """Sequence b's first S keys and values (Hkv, S, D) from a contiguous or paged cache."""
    if case.get("page_table") is None:
        return k_cache[b, :, :S], v_cache[b, :, :S]
    ps = k_cache.shape[2]
    t = np.arange(S)
    pages, offs = case["page_table"][b, t // ps], t % ps
    return np.swapaxes(k_cache[pages, :, offs], 0, 1), np.swapaxes(v_cache[pages, :, offs], 0, 1)


def run(case, backend, **kw):
    c = dict(case, k_cache=case["k_cache"].copy(), v_cache=case["v_cache"].copy())
    out, lse = kvcache(**c, return_lse=True, backend=backend, **kw)
    return out, lse, c["k_cache"], c["v_cache"]


def oracle(case, k_cache, v_cache, causal=True, window=(-1, -1), sinks=None, bias_fn=None):
    """Sequence by sequence on the caches as written: (out (total, Hq, Dv), lse (total, Hq))."""
    cu, seqlens = case["cu_seqlens_q"], case["cache_seqlens"]
    outs, lses = [], []
    for b in range(len(cu) - 1):
        L = int(cu[b + 1] - cu[b])
        S = int(seqlens[b]) + (L if case["key"] is not None else 0)
        k, v = sequence_cache(case, k_cache, v_cache, b, S)
        q = torch.tensor(np.swapaxes(case["query"][cu[b] : cu[b + 1]], 0, 1), dtype=torch.float64)
        k, v = (torch.tensor(np.asarray(x, np.float64)) for x in (k, v))
        bias = None if bias_fn is None else bias_fn(b, L, S)
        s = None if sinks is None else torch.tensor(sinks, dtype=torch.float64)
        o, lse = eager(q, k, v, bottom_right(L, S, causal, window), case["query"].shape[-1] ** -0.5, s, bias)
        outs.append(o.transpose(0, 1).numpy())
        lses.append(lse.transpose(0, 1).numpy())
    return np.concatenate(outs), np.concatenate(lses)


def check(got, want, case):
    q = np.asarray(case["query"], np.float64)
    kc, vc = (np.nan_to_num(np.asarray(case[n], np.float64)) for n in ("k_cache", "v_cache"))
    assert_out_close(got[0], want[0], 4 * out_atol(np.float32, q, kc, vc, None), what="packed out")
    assert_out_close(got[1], want[1], 4 * lse_atol(np.float32, q, kc, None), what="packed lse")


# decode steps (1 token), chunks, sequences with nothing new; a long cache for split-KV
MIXES = {
    "decode+prefill": ([1, 9, 1, 0, 5], [20, 0, 33, 7, 40]),
    "all-decode": ([1, 1, 1], [5, 50, 0]),
    "one-chunk": ([30], [10]),
}


@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("page_size", [None, 4, 16], ids=["contiguous", "pages4", "pages16"])
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_packed_calls_match_the_oracle(rng, backend, page_size, mix):
    case = make(rng, *MIXES[mix])
    if page_size:
        case = paged(case, page_size, rng)
    for splits in (1, 3, None):
        out, lse, kc, vc = run(case, backend, num_splits=splits)
        assert out.shape == (case["query"].shape[0], 4, 8) and lse.shape == case["query"].shape[:2]
        check((out, lse), oracle(case, kc, vc), case)


@pytest.mark.parametrize("backend", PACKED)
def test_the_new_entries_go_to_their_slots(rng, backend):
    case = make(rng, [1, 3, 0, 2], [4, 0, 9, 60])
    _, _, kc, vc = run(case, backend)
    cu = case["cu_seqlens_q"]
    for b in range(4):
        n, at = int(cu[b + 1] - cu[b]), int(case["cache_seqlens"][b])
        np.testing.assert_array_equal(kc[b, :, at : at + n], np.swapaxes(case["key"][cu[b] : cu[b + 1]], 0, 1))
        np.testing.assert_array_equal(vc[b, :, at : at + n], np.swapaxes(case["value"][cu[b] : cu[b + 1]], 0, 1))
        rest = np.ones(64, bool)
        rest[at : at + n] = False
        np.testing.assert_array_equal(kc[b][:, rest], case["k_cache"][b][:, rest])  # nothing else written


@pytest.mark.parametrize("backend", PACKED)
def test_windows_gqa_sinks_mods_and_no_new_entries(rng, backend):
    slopes = np.array([0.1, 0.2, 0.4, 0.8], np.float32)

    def alibi(score, b, h, q_idx, kv_idx, slopes):
        return score - slopes[h] * (q_idx - kv_idx) + 0.5 * b

    def bias(b, L, S):
        i = (S - L + np.arange(L))[:, None]
        return -slopes[:, None, None].astype(np.float64) * (i - np.arange(S)[None, :]) + 0.5 * b

    sinks = np.array([0.5, -1.0, 2.0, -np.inf], np.float32)
    for new in (True, False):
        case = make(rng, [1, 6, 2], [10, 3, 30], Hq=4, Hkv=1, new=new)
        for kw, want_kw in (
            (dict(window=(4, 0)), dict(window=(4, 0))),
            (dict(is_causal=False, window=(2, 1)), dict(causal=False, window=(2, 1))),
            (dict(sinks=sinks), dict(sinks=sinks)),
            (dict(score_mod=alibi, mod_args=(slopes,)), dict(bias_fn=bias)),
        ):
            out, lse, kc, vc = run(case, backend, **kw)
            check((out, lse), oracle(case, kc, vc, **want_kw), case)


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_sixteen_bit_caches(rng, cache_dtype):
    import ml_dtypes

    dt = np.dtype(getattr(ml_dtypes, cache_dtype) if cache_dtype == "bfloat16" else cache_dtype)
    case = paged(make(rng, [1, 12, 1], [30, 5, 0], cache_dtype=dt), 8, rng)
    want = run(case, "reference")
    got = run(case, "cpu")
    for i in (2, 3):  # the same writes, bit for bit
        np.testing.assert_array_equal(got[i].view(np.uint16), want[i].view(np.uint16))
    np.testing.assert_allclose(got[0], want[0], atol=2e-6)
    np.testing.assert_allclose(got[1], want[1], atol=2e-6)


@pytest.mark.parametrize("backend", PACKED)
def test_one_mixed_call_equals_the_separate_calls(rng, backend):
    """A decode batch (1 token each) and a prefill chunk per sequence, in one packed call, give
    what the uniform calls they replace give, and write the same caches."""
    lens, seqlens = [1, 1, 16, 1, 16], [30, 12, 0, 7, 20]
    case = make(rng, lens, seqlens)
    out, lse, kc, vc = run(case, backend)
    cu = case["cu_seqlens_q"]
    for group in ([0, 1, 3], [2], [4]):
        L = lens[group[0]]
        rows = np.concatenate([np.arange(cu[b], cu[b + 1]) for b in group]).reshape(len(group), L)
        sub = dict(
            query=np.swapaxes(case["query"][rows], 1, 2),
            k_cache=case["k_cache"][group].copy(),
            v_cache=case["v_cache"][group].copy(),
            key=np.swapaxes(case["key"][rows], 1, 2),
            value=np.swapaxes(case["value"][rows], 1, 2),
            cache_seqlens=case["cache_seqlens"][group],
        )
        o, lse_u = kvcache(**sub, return_lse=True, backend=backend)
        np.testing.assert_allclose(out[rows], np.swapaxes(o, 1, 2), atol=2e-6)
        np.testing.assert_allclose(lse[rows], np.swapaxes(lse_u, 1, 2), atol=2e-6)
        np.testing.assert_array_equal(kc[group], sub["k_cache"])
        np.testing.assert_array_equal(vc[group], sub["v_cache"])


# ---------------------------------------------------------------------------------------------
# the all-or-nothing rule


def _bad(rng, **over):
    case = make(rng, [1, 3], [5, 62])
    case.update(over)
    return case


def _shared_pages(rng):
    case = paged(make(rng, [2, 2], [3, 3]), 8, rng)
    case["page_table"][1, 0] = case["page_table"][0, 0]  # both sequences write slots 3, 4 of one page
    return case


def _page_out_of_range(rng):
    case = paged(make(rng, [2, 2], [3, 3]), 8, rng)
    case["page_table"][1, 0] = 999
    return case


ERRORS = [
    (
        "past-the-cache",
        lambda rng: _bad(rng),
        ValueError,
        r"writing 3 new keys at cache_seqlens\[1\] = 62 needs 65 slots, but the cache holds 64",
    ),
    (
        "past-the-cache-b",
        lambda rng: _bad(rng, cache_seqlens=np.array([64, 5], np.int32)),
        ValueError,
        r"writing 1 new keys at cache_seqlens\[0\] = 64 needs 65",
    ),
    (
        "offsets-decrease",
        lambda rng: _bad(rng, cu_seqlens_q=np.array([0, 3, 1], np.int32), cache_seqlens=np.array([1, 2], np.int32)),
        ValueError,
        r"cu_seqlens_q must not decrease",
    ),
    (
        "last-offset",
        lambda rng: _bad(rng, cu_seqlens_q=np.array([0, 1, 3], np.int32), cache_seqlens=np.array([1, 2], np.int32)),
        ValueError,
        r"cu_seqlens_q must end at the number of packed rows of query \(4, 4, 16\) \(4\)",
    ),
    (
        "offsets-dtype",
        lambda rng: _bad(rng, cu_seqlens_q=np.array([0.0, 1.0, 4.0]), cache_seqlens=np.array([1, 2], np.int32)),
        TypeError,
        r"cu_seqlens_q must hold integers",
    ),
    (
        "batch",
        lambda rng: _bad(
            rng, cu_seqlens_q=np.array([0, 1, 2, 4], np.int32), cache_seqlens=np.array([1, 2, 3], np.int32)
        ),
        ValueError,
        r"a contiguous k_cache must have the query's batch size 3 first",
    ),
    (
        "query-rank",
        lambda rng: _bad(rng, query=np.zeros((1, 4, 4, 16), np.float32), cache_seqlens=np.array([1, 2], np.int32)),
        ValueError,
        r"with cu_seqlens_q, query must be packed \(total, Hq, D\)",
    ),
    (
        "key-rows",
        lambda rng: _bad(rng, key=np.zeros((3, 2, 16), np.float32), cache_seqlens=np.array([1, 2], np.int32)),
        ValueError,
        r"key must be packed as the query: \(total, Hkv, D\) = \(4, 2, 16\), got \(3, 2, 16\)",
    ),
    ("shared-page", _shared_pages, ValueError, r"sequences \[0, 1\] would write the same cache slot"),
    ("page-range", _page_out_of_range, ValueError, r"page_table\[1, 0\] = 999 is not a page of the cache"),
]


@pytest.mark.parametrize("name, make_case, exc, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_write_nothing(rng, name, make_case, exc, words):
    case = make_case(rng)
    before = case["k_cache"].copy(), case["v_cache"].copy()
    for backend in PACKED:
        with pytest.raises(exc, match=words):
            kvcache(**case, backend=backend)
        np.testing.assert_array_equal(case["k_cache"], before[0])
        np.testing.assert_array_equal(case["v_cache"], before[1])


def _untypable(score, b, h, q_idx, kv_idx):
    return score + q_idx.bit_length()  # Numba has no int.bit_length (and fails without a warning)


def _raising(score, b, h, q_idx, kv_idx):
    raise RuntimeError("a mod that fails while running")


@pytest.mark.parametrize("backend", PACKED)
def test_a_call_that_fails_after_the_write_leaves_the_caches_as_they_were(rng, backend):
    from numba.core.errors import TypingError

    mod, error = (_raising, RuntimeError) if backend == "reference" else (_untypable, TypingError)
    for case in (make(rng, [1, 4], [3, 9]), paged(make(rng, [1, 4], [3, 9]), 8, rng)):
        before = case["k_cache"].copy(), case["v_cache"].copy()
        with pytest.raises(error):
            kvcache(**case, score_mod=mod, backend=backend)
        np.testing.assert_array_equal(case["k_cache"], before[0])
        np.testing.assert_array_equal(case["v_cache"], before[1])


def test_cuda_refuses_packed_queries_by_name(rng):
    problem = validate_decode_args(**make(rng, [1, 2], [3, 4]))
    assert "packed queries (cu_seqlens_q) are not supported" in engine.get_backend("cuda").not_supported_reasons(
        problem
    )
