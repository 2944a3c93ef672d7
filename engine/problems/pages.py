"""The checks of a paged KV cache's page table (``attention_with_kvcache`` with ``page_table``):
page indices in range, every page a sequence reads or writes present, no two sequences writing one
slot, and no new key written over a slot that a sequence reads as its history. Run before any cache
slot is written."""

from __future__ import annotations

import numpy as np

__all__ = ["check_pages", "check_no_write_into_history"]


def check_pages(
    pt: np.ndarray, need: np.ndarray, seqlens: np.ndarray, L_new: int, page_size: int, num_pages: int
) -> None:
    """Every page a sequence reads or writes is a valid page index, and no two sequences write one
    slot. Entries past a sequence's last page are never read (vLLM pads them with anything)."""
    used = (need + page_size - 1) // page_size
    cols = np.arange(pt.shape[1])
    live = cols[None, :] < used[:, None]
    bad = live & ((pt < 0) | (pt >= num_pages))
    if bad.any():
        b, j = (int(x[0]) for x in np.nonzero(bad))
        raise ValueError(
            f"page_table[{b}, {j}] = {pt[b, j]} is not a page of the cache (0..{num_pages - 1}); "
            f"sequence {b} uses its first {used[b]} pages"
        )
    if L_new and pt.shape[0] > 1:
        pos = seqlens[:, None] + np.arange(L_new)[None, :]
        slot = pt[np.arange(pt.shape[0])[:, None], pos // page_size].astype(np.int64) * page_size + pos % page_size
        flat = slot.reshape(-1)
        uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
        if (counts > 1).any():
            s = uniq[counts > 1][0]
            who = sorted({int(i) // L_new for i in np.nonzero(flat == s)[0]})
            raise ValueError(
                f"sequences {who} would write the same cache slot (page {s // page_size}, offset "
                f"{s % page_size}): their page_table rows share a page where new keys go"
            )
    if L_new:
        check_no_write_into_history(pt, seqlens, L_new, page_size, num_pages)


def check_no_write_into_history(pt: np.ndarray, seqlens: np.ndarray, L_new: int, page_size: int, num_pages: int):
    """No new key goes into a slot that a sequence reads as its history (its first
    ``cache_seqlens`` keys): with a shared prefix page, a sequence whose length ends inside that
    page would append over another's cached key (the torn-block hazard of paged serving; the caller
    copies the page first, copy on write). One pass marks the pages written to and finds them
    among the pages holding history; only where one is found (pages shared with a writer) are the
    slots compared."""
    B, width = pt.shape
    hist = (seqlens + page_size - 1) // page_size  # pages holding history (validated above)
    ncols = int(hist.max()) if B else 0
    if ncols == 0:
        return
    rows = np.arange(B)[:, None]
    pos = seqlens[:, None] + np.arange(L_new)[None, :]  # (B, L_new) positions written
    page = pt[rows, pos // page_size].astype(np.int64)
    written = np.zeros(num_pages, bool)
    written[page] = True
    # entries past a row's history may hold anything (vLLM pads with any value): clipped, then masked
    hits = written.take(pt[:, :ncols], mode="clip") & (np.arange(ncols)[None, :] < hist[:, None])
    own = seqlens // page_size  # a sequence appending to its own last, partial page: its history
    partial = np.nonzero(own < ncols)[0]  # there lies below what it writes, not a hazard
    hits[partial, own[partial]] = False
    if not hits.any():
        return
    offset = pos % page_size
    fill = np.clip(seqlens[:, None] - np.arange(ncols)[None, :] * page_size, 0, page_size)  # history slots
    for b2, j in zip(*np.nonzero(hits)):  # pages a writer shares: the slots decide
        p = pt[b2, j]
        for b, t in zip(*np.nonzero((page == p) & (offset < fill[b2, j]))):
            o = int(offset[b, t])
            whose = "its own" if b2 == b else f"sequence {b2}'s"
            raise ValueError(
                f"sequence {b} would write its new key {t} (position {int(pos[b, t])}) into page {p}, slot {o}, "
                f"which holds {whose} cached key at position {j * page_size + o} (cache_seqlens[{b2}] = "
                f"{int(seqlens[b2])}): page_table[{b}, {int(pos[b, t]) // page_size}] and page_table[{b2}, {j}] "
                f"name the same page; copy the shared page before appending to it (copy on write)"
            )
