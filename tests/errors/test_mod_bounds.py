"""A mod indexing a ``mod_args`` array past its end gets a ValueError naming the mod, the indices
and the shapes before any kernel runs, on the first call and on a call plan's cached calls alike
(the compiled kernels check no bounds: a per-head table one entry short read the memory after it,
silently; found by a trial, 2026-12-07)."""

import numpy as np
import pytest

import engine

B, H, L, S, D = 2, 4, 16, 48, 32


def head_bias(score, b, h, q_idx, kv_idx, bias):
    return score + bias[h]


def relative_bias(score, b, h, q_idx, kv_idx, table, offset):
    return score + table[q_idx - kv_idx + offset]


def key_mask(b, h, q_idx, kv_idx, keep):
    return keep[b, kv_idx] > 0


@pytest.fixture
def qkv(rng):
    q = rng.standard_normal((B, H, L, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(2))
    return q, k, v


def _sdpa(qkv, **kw):
    return engine.scaled_dot_product_attention(*qkv, backend="cpu", **kw)


def test_a_table_one_entry_short_is_refused_and_the_right_size_runs(qkv):
    with pytest.raises(ValueError, match=r"score_mod 'head_bias' indexes outside.*h=3.*shape \(3,\)"):
        _sdpa(qkv, score_mod=head_bias, mod_args=(np.ones(H - 1, np.float32),))
    bias = np.arange(H, dtype=np.float32)
    got = _sdpa(qkv, score_mod=head_bias, mod_args=(bias,))
    want = engine.scaled_dot_product_attention(*qkv, backend="reference", score_mod=head_bias, mod_args=(bias,))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_cached_call_with_a_shorter_table_is_refused(qkv):
    """The plan's key has the arrays' types, not their shapes: the cached path probes too."""
    table = np.zeros(L + S - 1, np.float32)
    for _ in range(2):  # the second call goes through the plan
        _sdpa(qkv, score_mod=relative_bias, mod_args=(table, S - 1))
    with pytest.raises(ValueError, match=r"q_idx=15, kv_idx=0 .*shape \(62,\)"):
        _sdpa(qkv, score_mod=relative_bias, mod_args=(table[:-1], S - 1))
    with pytest.raises(ValueError, match="relative_bias"):  # a number moves the index past the end
        _sdpa(qkv, score_mod=relative_bias, mod_args=(table, S))
    _sdpa(qkv, score_mod=relative_bias, mod_args=(table, S - 1))


def test_small_arrays_are_told_apart_by_value(qkv):
    """An offset passed as a 0-d array (or a tensor) is a number: a cached call with another one
    is probed again (keyed by shape alone, a second call with an offset past the table read the
    memory after it; found by a trial)."""
    table = np.zeros(L + S - 1, np.float32)
    for _ in range(2):
        _sdpa(qkv, score_mod=relative_bias, mod_args=(table, np.array(S - 1)))
    with pytest.raises(ValueError, match="relative_bias"):
        _sdpa(qkv, score_mod=relative_bias, mod_args=(table, np.array(S + 10**6)))
    with pytest.raises(ValueError, match="relative_bias"):
        _sdpa(qkv, score_mod=relative_bias, mod_args=(table, np.array(S, dtype=np.int32)))


def test_a_mods_own_index_error_reaches_the_caller_as_itself(qkv):
    """Only NumPy's bounds errors are the probe's: an IndexError the mod raises is the mod's."""

    def strict(score, b, h, q_idx, kv_idx):
        if kv_idx == S - 1 and q_idx == L - 1:
            raise IndexError("the mod's own")
        return score

    with pytest.raises(IndexError, match="the mod's own"):
        _sdpa(qkv, score_mod=strict)


def test_mask_mod_and_block_mask(qkv):
    keep = np.ones((B, S - 1), np.float32)
    with pytest.raises(ValueError, match=r"mask_mod 'key_mask' indexes outside.*kv_idx=47"):
        _sdpa(qkv, mask_mod=key_mask, mod_args=(keep,))
    with pytest.raises(ValueError, match="mask_mod 'key_mask'"):
        engine.create_block_mask(key_mask, B, H, L, S, mod_args=(keep,))
    mask = engine.create_block_mask(key_mask, B, H, L, S, mod_args=(np.ones((B, S), np.float32),))
    _sdpa(qkv, block_mask=mask)


def test_decode_probes_every_position_the_cache_holds(rng):
    """The positions of a plan's later calls reach the capacity, so the table must cover it, even
    when this call's positions are small; the cache is left as it was."""
    cap = 64
    kc, vc = (rng.standard_normal((1, 2, cap, D)).astype(np.float32) for _ in range(2))
    q, kn, vn = (rng.standard_normal((1, 2, 1, D)).astype(np.float32) for _ in range(3))
    before = kc.copy(), vc.copy()

    def call(table):
        return engine.attention_with_kvcache(
            q, kc, vc, kn, vn, cache_seqlens=5, score_mod=relative_bias, mod_args=(table, cap - 1), backend="cpu"
        )

    with pytest.raises(ValueError, match=r"q_idx 0\.\.63, kv_idx 0\.\.63"):
        call(np.zeros(2 * cap - 2, np.float32))
    np.testing.assert_array_equal(kc, before[0])
    np.testing.assert_array_equal(vc, before[1])
    for _ in range(2):
        call(np.zeros(2 * cap - 1, np.float32))
    kc[:], vc[:] = before
    with pytest.raises(ValueError, match="relative_bias"):  # the cached path
        call(np.zeros(2 * cap - 2, np.float32))
    np.testing.assert_array_equal(kc, before[0])


def test_decode_without_new_keys_through_its_plan(rng):
    cap = 32
    kc, vc = (rng.standard_normal((2, 2, cap, D)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((2, 2, 3, D)).astype(np.float32)

    def call(table, seqlens):
        return engine.attention_with_kvcache(
            q, kc, vc, cache_seqlens=seqlens, score_mod=relative_bias, mod_args=(table, cap + 2), backend="cpu"
        )

    table = np.zeros(2 * cap + 2, np.float32)  # q_idx - kv_idx + cap + 2 from 0 to 2 * cap + 1
    for seqlens in (np.array([0, 9], np.int32), np.array([4, 9], np.int32), 7):
        call(table, seqlens)  # the first call plans, the others go through the plan
    # the cached calls' ranges follow cache_seqlens: q_idx = S_b - 3 + i goes below 0 for S_b < 3
    with pytest.raises(ValueError, match=r"q_idx -3\.\.31, kv_idx 0\.\.31"):
        call(table[:-1], np.array([0, 9], np.int32))
    with pytest.raises(ValueError, match=r"q_idx 0\.\.31, kv_idx 0\.\.31"):
        call(table[:-1], np.array([3, 9], np.int32))


def test_varlen_positions_within_each_sequence(rng):
    q = rng.standard_normal((10, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((30, H, D)).astype(np.float32) for _ in range(2))
    cu_q, cu_k = np.array([0, 4, 10], np.int32), np.array([0, 12, 30], np.int32)

    def by_key(score, b, h, q_idx, kv_idx, t):
        return score + t[kv_idx]

    with pytest.raises(ValueError, match=r"kv_idx=17"):
        engine.varlen_attention(q, k, v, cu_q, cu_k, score_mod=by_key, mod_args=(np.zeros(17),), backend="cpu")
    engine.varlen_attention(q, k, v, cu_q, cu_k, score_mod=by_key, mod_args=(np.zeros(18),), backend="cpu")


def test_varlen_probes_each_sequence_at_its_own_positions(rng):
    """A per-token table read through per-sequence starts is valid for every sequence: paired with
    the longest sequence's positions, a short one was refused (found by a trial)."""
    cu = np.array([0, 20, 25], np.int32)
    q, k, v = (rng.standard_normal((25, 2, 16)).astype(np.float32) for _ in range(3))

    def token_bias(score, b, h, q_idx, kv_idx, bias, start):
        return score + bias[start[b] + q_idx]

    bias, start = rng.standard_normal(25).astype(np.float32), cu[:-1].astype(np.int64)
    kw = dict(score_mod=token_bias, mod_args=(bias, start))
    np.testing.assert_allclose(
        engine.varlen_attention(q, k, v, cu, cu, backend="cpu", **kw),
        engine.varlen_attention(q, k, v, cu, cu, backend="reference", **kw),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match=r"b=1, h=0, q_idx=4"):
        engine.varlen_attention(q, k, v, cu, cu, score_mod=token_bias, mod_args=(bias, start + 1), backend="cpu")


def test_unhashable_mod_args_are_memoised_by_identity(qkv):
    """A Numba typed List among mod_args (passed as it is) broke the probe's memo (found by a
    trial): keyed by identity instead."""
    from numba.typed import List

    def by_list(score, b, h, q_idx, kv_idx, lst):
        return score + lst[h]

    table = List([0.5] * H)
    for _ in range(2):
        _sdpa(qkv, score_mod=by_list, mod_args=(table,))
    # (a typed List checks its bounds itself, in Python and in the kernels: its own IndexError)
    with pytest.raises(IndexError, match="list index out of range"):
        _sdpa(qkv, score_mod=by_list, mod_args=(List([0.5] * (H - 1)),))


def test_engine_torch_tensor_tables(qkv):
    torch = pytest.importorskip("torch")
    import engine.torch as et

    tq, tk, tv = (torch.from_numpy(a) for a in qkv)
    with pytest.raises(ValueError, match="head_bias"):
        et.scaled_dot_product_attention(tq, tk, tv, score_mod=head_bias, mod_args=(torch.ones(H - 1),))
    et.scaled_dot_product_attention(tq, tk, tv, score_mod=head_bias, mod_args=(torch.ones(H),))


def test_other_exceptions_are_left_to_the_kernels(qkv):
    """A mod that raises something else in Python (here a division by the probe's score 0.0) is
    not refused by the probe: the kernels define what it computes."""

    def inverse(score, b, h, q_idx, kv_idx):
        return 1.0 / score

    out = _sdpa(qkv, score_mod=inverse)
    assert out.shape == (B, H, L, D)
