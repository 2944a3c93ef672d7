"""Decoding cases shared by the decode specification (``decode/test_decoding.py``) and the
``cuda`` decode tests: random caches with ragged lengths, their paged form, and the closeness rule."""

import numpy as np

from conftest import randn
from tolerances import assert_out_close, lse_atol, out_atol


def make_case(
    rng, B=3, Hq=4, Hkv=2, L=1, L_new=1, D=16, Dv=8, S_max=48, cache_dtype=np.float32, q_dtype=np.float32, seqlens=None
):
    """Query, caches filled with random entries (also past each sequence's length: never read),
    new key/value, and ragged seqlens that leave room for the new entries."""
    if seqlens is None:
        seqlens = rng.integers(0, S_max - L_new + 1, B)
    return dict(
        query=randn(rng, (B, Hq, L, D), q_dtype),
        k_cache=randn(rng, (B, Hkv, S_max, D)).astype(cache_dtype),
        v_cache=randn(rng, (B, Hkv, S_max, Dv)).astype(cache_dtype),
        key=randn(rng, (B, Hkv, L_new, D)) if L_new else None,
        value=randn(rng, (B, Hkv, L_new, Dv)) if L_new else None,
        cache_seqlens=np.asarray(seqlens, np.int32),
    )


def paged(case, page_size, rng):
    """The same case with its caches cut into shuffled pages of ``page_size`` and a page table
    (padded with -1 past the pages each sequence has: those entries are never read)."""
    kc, vc = case["k_cache"], case["v_cache"]
    B, Hkv, S_max, _ = kc.shape
    per_seq = -(-S_max // page_size)
    total = B * per_seq + 3  # a few spare pages nobody uses
    order = rng.permutation(total)[: B * per_seq].reshape(B, per_seq).astype(np.int32)
    kp = np.full((total, Hkv, page_size, kc.shape[3]), np.nan, kc.dtype)
    vp = np.full((total, Hkv, page_size, vc.shape[3]), np.nan, vc.dtype)
    for b in range(B):
        for t in range(S_max):
            kp[order[b, t // page_size], :, t % page_size] = kc[b, :, t]
            vp[order[b, t // page_size], :, t % page_size] = vc[b, :, t]
    table = np.full((B, per_seq + 2), -1, np.int32)
    table[:, :per_seq] = order
    # a NaN-filled slot is fine here: slots past S_max exist only in a last partial page, never read
    return dict(case, k_cache=kp, v_cache=vp, page_table=table)


def close(got, want, case, what=""):
    """Within the forward tests' float32 bounds (4x: tiles and splits sum in other orders); the
    bounds come from the finite entries (unused pages and planted NaNs left out)."""
    q, k, v = (
        np.nan_to_num(np.asarray(case[n], np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        for n in ("query", "k_cache", "v_cache")
    )
    atol = 4 * out_atol(np.float32, q, k, v, None)
    assert_out_close(np.asarray(got[0], np.float64), np.asarray(want[0], np.float64), atol, what="out" + what)
    latol = 4 * lse_atol(np.float32, q, k, None)
    assert_out_close(np.asarray(got[1], np.float64), np.asarray(want[1], np.float64), latol, what="lse" + what)
