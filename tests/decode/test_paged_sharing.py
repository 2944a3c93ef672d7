"""Paged caches with shared pages (a shared prompt prefix): a new key written into a slot that a
sequence still reads as its history is refused before anything is written, with an error naming
the page, the slot and both sequences, and the caches are left as they were. Sharing pages that
only hold history is fine.

Before, ``attention_with_kvcache`` only caught two sequences writing the same slot: a sequence
whose ``cache_seqlens`` ended inside a shared page appended its key over the other sequence's
cached key (the torn-block hazard of paged serving engines)."""

import numpy as np
import pytest

import engine

from conftest import available_backends

PAGE = 4
H, HQ, D = 2, 4, 8
DECODE_BACKENDS = [b for b in available_backends() if engine.get_backend(b).supports_decode]


def _case(page_table, seqlens, seed=0):
    rng = np.random.default_rng(seed)
    table = np.asarray(page_table, np.int32)
    num_pages = int(table.max()) + 2
    k_cache = rng.standard_normal((num_pages, H, PAGE, D)).astype(np.float32)
    v_cache = rng.standard_normal((num_pages, H, PAGE, D)).astype(np.float32)
    B = table.shape[0]
    q = rng.standard_normal((B, HQ, 1, D)).astype(np.float32)
    k = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    v = rng.standard_normal((B, H, 1, D)).astype(np.float32)
    return dict(
        query=q,
        k_cache=k_cache,
        v_cache=v_cache,
        key=k,
        value=v,
        cache_seqlens=np.asarray(seqlens, np.int32),
        page_table=table,
    )


def _refused(case, backend, match):
    before = case["k_cache"].copy(), case["v_cache"].copy()
    with pytest.raises(ValueError, match=match):
        engine.attention_with_kvcache(**case, backend=backend)
    np.testing.assert_array_equal(case["k_cache"], before[0])
    np.testing.assert_array_equal(case["v_cache"], before[1])


@pytest.mark.parametrize("backend", ["auto"] + DECODE_BACKENDS)
def test_append_into_a_page_another_sequence_reads_is_refused(backend):
    # page 0 is a shared prefix: sequence 0 holds 6 keys (all of page 0, half of page 1);
    # sequence 1 holds 2 keys, both in page 0, so its new key would go to page 0, slot 2,
    # which sequence 0 reads as its key at position 2
    case = _case([[0, 1, 2], [0, 3, 4]], [6, 2])
    _refused(
        case,
        backend,
        r"sequence 1 would write its new key 0 \(position 2\) into page 0, slot 2, which holds sequence 0's "
        r"cached key at position 2 \(cache_seqlens\[0\] = 6\).*page_table\[1, 0\] and page_table\[0, 0\]",
    )


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_append_into_a_shared_page_at_another_column_is_refused(backend):
    # sequence 1 names sequence 0's first page as its second: its position 5 is page 0, slot 1
    case = _case([[0, 1, 2], [3, 0, 4]], [6, 5])
    _refused(case, backend, r"sequence 1 would write .* into page 0, slot 1, which holds sequence 0's cached key")


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_a_sequence_that_names_one_page_twice_cannot_overwrite_its_own_history(backend):
    case = _case([[2, 2, 3]], [4])  # position 4 is page 2, slot 0: its own position 0
    _refused(
        case, backend, r"sequence 0 would write .* into page 2, slot 0, which holds its own cached key at position 0"
    )


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_shared_history_pages_with_private_appends_are_accepted(backend):
    """The supported way to share a prefix: full shared pages, appends into private pages."""
    case = _case([[0, 1, 2], [0, 3, 4]], [5, 7])  # page 0 is history for both; writes go to pages 1 and 3
    shared_before = case["k_cache"][0].copy()
    expected = _contiguous_result(case)
    out = engine.attention_with_kvcache(**case, backend=backend)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(case["k_cache"][0], shared_before)


def _contiguous_result(case):
    """The same step on per-sequence contiguous copies of the caches (nothing shared)."""
    table, seqlens = case["page_table"], case["cache_seqlens"]
    B, width = table.shape
    kc = case["k_cache"][table].transpose(0, 2, 1, 3, 4).reshape(B, H, width * PAGE, D).copy()
    vc = case["v_cache"][table].transpose(0, 2, 1, 3, 4).reshape(B, H, width * PAGE, D).copy()
    return engine.attention_with_kvcache(
        case["query"], kc, vc, key=case["key"], value=case["value"], cache_seqlens=seqlens, backend="reference"
    )


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_append_into_another_sequences_partial_last_page_is_refused(backend):
    # both sequences end inside shared page 0: sequence 0 (2 keys) would write slot 2, which
    # sequence 1 (3 keys) reads as its position 2 (was accepted: each page was skipped as a
    # sequence's own last, partial page)
    case = _case([[0, 5], [0, 6]], [2, 3])
    _refused(
        case,
        backend,
        r"sequence 0 would write its new key 0 \(position 2\) into page 0, slot 2, which holds sequence 1's",
    )


def _packed(case, new_lens, seed=1):
    """The case as a packed mixed call: sequence b brings new_lens[b] new tokens."""
    rng = np.random.default_rng(seed)
    total = int(sum(new_lens))
    case = dict(case)
    case["query"] = rng.standard_normal((total, HQ, D)).astype(np.float32)
    case["key"] = rng.standard_normal((total, H, D)).astype(np.float32)
    case["value"] = rng.standard_normal((total, H, D)).astype(np.float32)
    case["cu_seqlens_q"] = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int32)
    return case


PACKED_BACKENDS = [b for b in DECODE_BACKENDS if b != "cuda"]  # cuda refuses packed queries by name


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
@pytest.mark.parametrize(
    "table, seqlens, new_lens, match",
    [
        # a shared prefix of pages 0 and 1: sequence 1 (6 keys) appends at page 1, slot 2, which
        # sequence 0 (8 keys) reads (was accepted with cu_seqlens_q: the packed path skipped the check)
        (
            [[0, 1, 2, 9], [0, 1, 3, 9]],
            [8, 6],
            [1, 1],
            r"sequence 1 would write its new key 0 \(position 6\) into page 1, slot 2, which holds sequence 0's",
        ),
        # a chunk of 3 new tokens from a page named twice runs over the sequence's own history
        (
            [[2, 2, 3]],
            [2],
            [3],
            r"sequence 0 would write its new key 2 \(position 4\) into page 2, slot 0, which holds its own",
        ),
    ],
)
def test_packed_writes_into_history_are_refused(backend, table, seqlens, new_lens, match):
    _refused(_packed(_case(table, seqlens), new_lens), backend, match)


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
def test_packed_private_appends_after_a_shared_prefix_are_accepted(backend):
    case = _packed(_case([[0, 1, 2], [0, 3, 4]], [5, 7]), [2, 0])
    shared_before = case["k_cache"][0].copy()
    engine.attention_with_kvcache(**case, backend=backend)
    np.testing.assert_array_equal(case["k_cache"][0], shared_before)
