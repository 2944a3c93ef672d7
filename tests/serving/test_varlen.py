"""``engine.varlen_attention`` and its backward: every backend with a varlen op against the float64
eager oracle (``eager_oracle``, torch sequence by sequence): ragged and empty sequences, causal
bottom-right per sequence, windows, GQA, mods at positions within the sequence, sinks, both cpu key
layouts (in place for decode-like batches, head-major for prefill), split-KV, 16-bit inputs; the
gradients and their determinism; the errors (raised before any kernel runs); cuda's refusal."""

import numpy as np
import pytest
import torch

import engine
from engine.problems.varlen import VarlenBackwardProblem, VarlenProblem, validate_varlen_args

from conftest import available_backends, randn
from eager_oracle import eager_varlen, leaf
from tolerances import assert_out_close, lse_atol, out_atol

VARLEN = [n for n in available_backends() if engine.get_backend(n).op(VarlenProblem) is not None]
VARLEN_BWD = [n for n in available_backends() if engine.get_backend(n).op(VarlenBackwardProblem) is not None]


def offsets(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def make(rng, lens_q, lens_k, Hq=4, H=2, E=16, Ev=8, dtype=np.float32):
    cq, ck = offsets(lens_q), offsets(lens_k)
    return dict(
        query=randn(rng, (cq[-1], Hq, E), dtype),
        key=randn(rng, (ck[-1], H, E), dtype),
        value=randn(rng, (ck[-1], H, Ev), dtype),
        cu_seqlens_q=cq,
        cu_seqlens_k=ck,
    )


def oracle(case, **kw):
    q, k, v = (torch.tensor(np.asarray(case[n], np.float64)) for n in ("query", "key", "value"))
    sinks = kw.pop("sinks", None)
    out, lse = eager_varlen(
        q, k, v, case["cu_seqlens_q"], case["cu_seqlens_k"], sinks=None if sinks is None else torch.tensor(sinks), **kw
    )
    return out.numpy(), lse.numpy()


def check(got, want, case, dtype=np.float32, scale=None):
    q, k, v = (np.asarray(case[n], np.float64) for n in ("query", "key", "value"))
    assert_out_close(got[0], want[0], 4 * out_atol(dtype, q, k, v, scale), what="varlen out")
    assert_out_close(got[1], want[1], 4 * lse_atol(dtype, q, k, scale), what="varlen lse")


# ragged batches: empty sequences, more queries than keys, one key, decode-like rows, long prefill
SHAPES = {
    "ragged": ([3, 0, 5, 1, 4], [4, 2, 5, 0, 9]),
    "decode-like": ([1, 1, 1, 1], [30, 0, 300, 7]),
    "prefill": ([200, 1, 130, 0, 7], [200, 600, 140, 3, 9]),
    "more-queries-than-keys": ([9, 6], [3, 1]),
    "one-long": ([300], [300]),
}


@pytest.mark.parametrize("backend", VARLEN)
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, (5, None)), (False, (4, 2))])
def test_forward_matches_the_oracle(rng, backend, shape, causal, window):
    case = make(rng, *SHAPES[shape])
    got = engine.varlen_attention(**case, is_causal=causal, window=window, return_lse=True, backend=backend)
    assert got[0].shape == case["query"].shape[:2] + (8,) and got[0].dtype == np.float32
    assert got[1].shape == case["query"].shape[:2]
    check(got, oracle(case, causal=causal, window=window or (-1, -1)), case)


@pytest.mark.parametrize("backend", VARLEN)
def test_gqa_mqa_float64_and_scale(rng, backend):
    for Hq, H in ((6, 3), (8, 1), (3, 3)):
        case = make(rng, [5, 17, 2], [9, 17, 40], Hq=Hq, H=H, dtype=np.float64)
        got = engine.varlen_attention(**case, is_causal=True, scale=0.3, return_lse=True, backend=backend)
        check(got, oracle(case, causal=True, scale=0.3), case, np.float64, 0.3)


@pytest.mark.parametrize("backend", VARLEN)
def test_sinks(rng, backend):
    """With sinks: the sink column joins each row's softmax; a row with no visible key (causal,
    more queries than keys) gives zeros and lse = its head's sink; a -inf sink is no sink."""
    case = make(rng, [6, 2, 3], [2, 5, 0], Hq=4, H=2)
    sinks = np.array([0.5, -1.0, 2.0, -np.inf], np.float32)
    out, lse = engine.varlen_attention(**case, is_causal=True, sinks=sinks, return_lse=True, backend=backend)
    want = oracle(case, causal=True, sinks=sinks.astype(np.float64))
    check((out, lse), want, case)
    empty = np.array([0, 1, 2, 3, 8, 9, 10])  # rows that see no key: 4 of sequence 0, sequence 2
    np.testing.assert_array_equal(out[empty], 0.0)
    np.testing.assert_array_equal(lse[empty], np.broadcast_to(sinks, (len(empty), 4)))
    plain = engine.varlen_attention(**case, is_causal=True, return_lse=True, backend=backend)
    np.testing.assert_allclose(out[:, 3], plain[0][:, 3], atol=1e-6)  # the -inf sink


def _alibi(score, b, h, q_idx, kv_idx, slopes):
    return score - slopes[h] * abs(q_idx - kv_idx) + 0.25 * b


def _stripe(b, h, q_idx, kv_idx, slopes):
    return (q_idx + kv_idx + b) % 3 != 0


@pytest.mark.parametrize("backend", VARLEN)
def test_mods_see_positions_within_the_sequence(rng, backend):
    """q_idx is the row's position under the bottom-right alignment, kv_idx the key's index, b the
    sequence (the oracle writes the same bias and mask out densely)."""
    case = make(rng, [4, 1, 7], [9, 12, 7])
    slopes = np.array([0.1, 0.3, 0.5, 0.7], np.float32)
    got = engine.varlen_attention(
        **case, is_causal=True, score_mod=_alibi, mask_mod=_stripe, mod_args=(slopes,), return_lse=True, backend=backend
    )
    lens_q, lens_k = np.diff(case["cu_seqlens_q"]), np.diff(case["cu_seqlens_k"])

    def bias(b, L, S):
        i = (S - L + np.arange(L))[:, None]
        j = np.arange(S)[None, :]
        stripe = (i + j + b) % 3 != 0
        return np.where(stripe, -slopes[:, None, None].astype(np.float64) * np.abs(i - j) + 0.25 * b, -np.inf)

    q, k, v = (torch.tensor(np.asarray(case[n], np.float64)) for n in ("query", "key", "value"))
    want = eager_varlen(q, k, v, case["cu_seqlens_q"], case["cu_seqlens_k"], causal=True, bias_fn=bias)
    assert (lens_q <= lens_k).all()
    check(got, (want[0].numpy(), want[1].numpy()), case)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_inputs_on_cpu(rng, dtype):
    import ml_dtypes

    dt = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
    case = make(rng, [30, 1, 140], [30, 50, 140])
    case16 = dict(case, **{n: case[n].astype(dt) for n in ("query", "key", "value")})
    out, lse = engine.varlen_attention(**case16, is_causal=True, return_lse=True, backend="cpu")
    assert out.dtype == dt and lse.dtype == dt
    want = engine.varlen_attention(**case16, is_causal=True, return_lse=True, backend="reference")
    step = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    np.testing.assert_allclose(out.astype(np.float64), want[0].astype(np.float64), atol=4 * step * 4)


def test_cpu_split_kv_and_both_key_layouts_agree(rng, monkeypatch):
    """A few long sequences (split-KV across threads) and a decode-like batch (keys read in place)
    give the reference's result; splits are forced by making the batch small against the threads."""
    import engine.backends.cpu.varlen as cv

    for lens_q, lens_k in (([1, 1], [2000, 1100]), ([1, 3], [1300, 1100]), ([40, 1], [1500, 2000])):
        case = make(rng, lens_q, lens_k, Hq=2, H=1)
        want = engine.varlen_attention(**case, is_causal=True, return_lse=True, backend="reference")
        seen = []
        real = cv.pick_num_splits
        monkeypatch.setattr(cv, "get_num_threads", lambda: 16)
        monkeypatch.setattr(cv, "pick_num_splits", lambda *a: seen.append(real(*a)) or seen[-1])
        got = engine.varlen_attention(**case, is_causal=True, return_lse=True, backend="cpu")
        monkeypatch.undo()
        assert seen and seen[0] > 1  # the split path ran
        check(got, want, case)


def test_cpu_calls_its_kernels_through_their_typed_entries(rng, monkeypatch):
    """The tiled kernel, the decode-like rows' kernel and the backward call the run compiled for
    their argument types (q, k, v typed read-only, as the dense forward's), not
    ``TaskKernel.__call__``, which types every argument on every call (about 80 us of a 120 us
    call of two 16-token sequences)."""
    from engine.kernels.task_pointer import TaskKernel

    def typed_again(self, args, mod_args):
        raise AssertionError("a varlen call went through TaskKernel.__call__")

    monkeypatch.setattr(TaskKernel, "__call__", typed_again)
    for name in ("prefill", "decode-like"):
        case = make(rng, *SHAPES[name], dtype=np.float64)
        for _ in range(2):
            out, lse = engine.varlen_attention(**case, is_causal=True, return_lse=True, backend="cpu")
            want = oracle(case, causal=True)
            check((out, lse), want, case, dtype=np.float64)
        g = rng.standard_normal(out.shape)
        got = engine.varlen_attention_backward(g, **case, out=out, lse=lse, is_causal=True, backend="cpu")
        want = _grads(case, g, causal=True, window=(-1, -1), sinks=None)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("backend", VARLEN)
def test_lse_merges_with_merge_attention(rng, backend):
    """lse is (total_q, Hq), the output's shape without its last axis: two halves of every
    sequence's keys merge into the whole (bidirectional attention)."""
    case = make(rng, [5, 3], [8, 6])
    ck = case["cu_seqlens_k"]
    halves = [np.concatenate([np.arange(ck[b], ck[b] + (ck[b + 1] - ck[b]) // 2) for b in range(2)])]
    halves.append(np.setdiff1d(np.arange(ck[-1]), halves[0]))
    parts = []
    for idx in halves:
        lens = [int(np.sum((idx >= ck[b]) & (idx < ck[b + 1]))) for b in range(2)]
        sub = dict(case, key=case["key"][idx], value=case["value"][idx], cu_seqlens_k=offsets(lens))
        parts.append(engine.varlen_attention(**sub, return_lse=True, backend=backend))
    merged = engine.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    whole = engine.varlen_attention(**case, return_lse=True, backend=backend)
    np.testing.assert_allclose(merged[0], whole[0], atol=2e-6)
    np.testing.assert_allclose(merged[1], whole[1], atol=2e-6)


def test_empty_batches(rng):
    for lens_q, lens_k in (([0, 0], [3, 0]), ([2, 1], [0, 0]), ([], [])):
        case = make(rng, lens_q, lens_k)
        out, lse = engine.varlen_attention(**case, return_lse=True, sinks=np.ones(4, np.float32))
        assert out.shape == (sum(lens_q), 4, 8)
        np.testing.assert_array_equal(out, 0.0)
        np.testing.assert_array_equal(lse, 1.0)


# ---------------------------------------------------------------------------------------------
# gradients


def _grads(case, grad_out, **kw):
    q, k, v = (leaf(case[n]) for n in ("query", "key", "value"))
    sinks = kw.pop("sinks", None)
    s = None if sinks is None else leaf(sinks)
    out, _ = eager_varlen(q, k, v, case["cu_seqlens_q"], case["cu_seqlens_k"], sinks=s, **kw)
    out.backward(torch.tensor(np.asarray(grad_out, np.float64)))
    return [t.grad.numpy() for t in (q, k, v) + (() if s is None else (s,))]


@pytest.mark.parametrize("backend", VARLEN_BWD)
@pytest.mark.parametrize("shape", ["ragged", "prefill", "decode-like"])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, (6, None)), (False, (3, 2))])
def test_gradients_match_autograd(rng, backend, shape, causal, window):
    case = make(rng, *SHAPES[shape], dtype=np.float64)
    sinks = rng.standard_normal(4)
    out, lse = engine.varlen_attention(**case, is_causal=causal, window=window, sinks=sinks, return_lse=True)
    g = rng.standard_normal(out.shape)
    got = engine.varlen_attention_backward(
        g,
        **case,
        out=out,
        lse=lse,
        is_causal=causal,
        window=window,
        sinks=sinks,
        return_sinks_grad=True,
        backend=backend,
    )
    want = _grads(case, g, causal=causal, window=window or (-1, -1), sinks=sinks)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert a.shape == b.shape and a.dtype == np.float64
        np.testing.assert_allclose(a, b, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("backend", VARLEN_BWD)
def test_gradients_float32_gqa_and_mods(rng, backend):
    case = make(rng, [40, 3, 130], [40, 90, 130], Hq=6, H=2)
    slopes = np.linspace(0.1, 0.6, 6).astype(np.float32)
    kw = dict(is_causal=True, score_mod=_alibi, mod_args=(slopes,))
    out, lse = engine.varlen_attention(**case, **kw, return_lse=True, backend=backend)
    g = randn(rng, out.shape)
    dq, dk, dv = engine.varlen_attention_backward(g, **case, out=out, lse=lse, **kw, backend=backend)
    want = engine.varlen_attention_backward(
        g.astype(np.float64),
        **{n: (x.astype(np.float64) if x.dtype.kind == "f" else x) for n, x in case.items()},
        out=out.astype(np.float64),
        lse=lse.astype(np.float64),
        **kw,
        backend="reference",
    )
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert a.dtype == np.float32
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, err_msg=name)


def test_cpu_gradients_are_deterministic(rng):
    case = make(rng, [300, 5, 90], [300, 400, 90], Hq=4, H=1)
    out, lse = engine.varlen_attention(**case, is_causal=True, return_lse=True)
    g = randn(rng, out.shape)
    first = engine.varlen_attention_backward(g, **case, out=out, lse=lse, is_causal=True, backend="cpu")
    for _ in range(2):
        again = engine.varlen_attention_backward(g, **case, out=out, lse=lse, is_causal=True, backend="cpu")
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


def test_backward_of_empty_sequences_is_zero(rng):
    case = make(rng, [0, 3], [4, 0], dtype=np.float64)
    out, lse = engine.varlen_attention(**case, return_lse=True)
    for backend in VARLEN_BWD:
        dq, dk, dv = engine.varlen_attention_backward(np.ones_like(out), **case, out=out, lse=lse, backend=backend)
        for a in (dq, dk, dv):
            np.testing.assert_array_equal(a, 0.0)


# ---------------------------------------------------------------------------------------------
# errors, before any kernel runs


def _case(**over):
    case = make(np.random.default_rng(0), [2, 3], [4, 1])
    case.update(over)
    return case


ERRORS = [
    (
        "offsets-decrease",
        dict(cu_seqlens_q=np.array([0, 4, 3, 5], np.int32)),
        ValueError,
        r"cu_seqlens_q must not decrease",
    ),
    ("offsets-start", dict(cu_seqlens_k=np.array([1, 4, 5], np.int32)), ValueError, r"cu_seqlens_k must start at 0"),
    (
        "last-offset",
        dict(cu_seqlens_q=np.array([0, 2, 4], np.int32)),
        ValueError,
        r"cu_seqlens_q must end at the number of packed rows of query \(5, 4, 16\) \(5\), got cu_seqlens_q\[2\] = 4",
    ),
    (
        "offsets-lengths",
        dict(cu_seqlens_k=np.array([0, 5], np.int32)),
        ValueError,
        r"cu_seqlens_q and cu_seqlens_k must describe the same sequences, got 2 and 1",
    ),
    ("offsets-float", dict(cu_seqlens_q=np.array([0.0, 2.0, 5.0])), TypeError, r"cu_seqlens_q must hold integers"),
    (
        "offsets-2d",
        dict(cu_seqlens_q=np.zeros((1, 3), np.int32)),
        ValueError,
        r"cu_seqlens_q must have shape \(B \+ 1,\)",
    ),
    ("offsets-none", dict(cu_seqlens_k=None), TypeError, r"cu_seqlens_k must be an integer array"),
    (
        "query-rank",
        dict(query=np.zeros((1, 5, 4, 16), np.float32)),
        ValueError,
        r"query must be packed \(total_q, Hq, E\)",
    ),
    (
        "heads",
        dict(key=np.zeros((5, 3, 16), np.float32), value=np.zeros((5, 3, 8), np.float32)),
        ValueError,
        r"must divide",
    ),
    ("head-size", dict(key=np.zeros((5, 2, 8), np.float32)), ValueError, r"same head size E"),
    ("value-rows", dict(value=np.zeros((4, 2, 8), np.float32)), ValueError, r"key and value must have the same rows"),
    ("dtypes", dict(value=np.zeros((5, 2, 8), np.float64)), TypeError, r"share one dtype"),
    ("int-query", dict(query=np.zeros((5, 4, 16), np.int32)), TypeError, r"query must have a floating dtype"),
]


@pytest.mark.parametrize("name, over, exc, words", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_inputs_are_refused_by_name(name, over, exc, words):
    with pytest.raises(exc, match=words):
        validate_varlen_args(**_case(**over))
    with pytest.raises(exc, match=words):
        engine.varlen_attention(**_case(**over))


def test_bad_arguments_are_refused_by_name():
    case = _case()
    for kw, exc, words in (
        (dict(sinks=np.zeros(3)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
        (
            dict(sinks=np.array([0, np.nan, 0, 0])),
            ValueError,
            r"sinks must be finite or -inf \(no sink\), got sinks\[1\] = nan",
        ),
        (dict(sinks=np.zeros(4, np.int32)), TypeError, r"sinks must have a floating dtype"),
        (dict(window=(-2, 0)), ValueError, r"window left must be an int >= 0"),
        (dict(is_causal=1), TypeError, r"is_causal must be a bool"),
        (dict(mod_args=(1,)), ValueError, r"mod_args given without score_mod"),
        (dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ):
        with pytest.raises(exc, match=words):
            engine.varlen_attention(**case, **kw)
    out, lse = engine.varlen_attention(**case, return_lse=True)
    for kw, exc, words in (
        (dict(out=out[:4]), ValueError, r"out must have shape \(5, 4, 8\)"),
        (dict(lse=lse.T), ValueError, r"lse must have shape \(5, 4\)"),
        (dict(lse=lse.astype(np.float16)), TypeError, r"lse must be at least as precise as query"),
        (dict(return_sinks_grad=True), ValueError, r"return_sinks_grad=True needs sinks="),
    ):
        args = dict(case, out=out, lse=lse, grad_out=np.ones_like(out))
        args.update(kw)
        with pytest.raises(exc, match=words):
            engine.varlen_attention_backward(**args)


def test_cuda_refuses_by_name(rng):
    """cuda has no varlen op: dispatch lists it, so ``auto`` never picks it and an explicit request
    says why."""
    problem = validate_varlen_args(**_case())
    cuda = engine.get_backend("cuda")
    assert "packed variable-length attention (varlen_attention) is not supported" in cuda.not_supported_reasons(problem)
    with pytest.raises(engine.NotSupportedError, match="varlen_attention"):
        engine.varlen_attention(**_case(), backend="cuda")
