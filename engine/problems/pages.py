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


def check_no_write_into_history(pt: np.ndarray, seqlens: np.ndarray, new_lens, page_size: int, num_pages: int):
    """No new key goes into a slot that a sequence reads as its history (its first
    ``cache_seqlens`` keys): with a shared prefix page, a sequence whose length ends inside that
    page would append over another's cached key (the torn-block hazard of paged serving; the caller
    copies the page first, copy on write), and a page table naming one page twice would append over
    the sequence's own history. ``new_lens``: the new keys per sequence, an int or an int array
    ``(B,)`` (packed calls, ``cu_seqlens_q``). One pass finds, per page, the most slots any
    sequence reads from it as history; a write at a lower offset of that page is the hazard."""
    B, width = pt.shape
    lens = np.broadcast_to(np.asarray(new_lens, dtype=np.int64), (B,))
    hist = (seqlens + page_size - 1) // page_size  # pages holding history (validated above)
    ncols = int(hist.max()) if B else 0
    most = int(lens.max()) if B else 0
    if ncols == 0 or most == 0:
        return
    # history slots per (sequence, page column); entries past a row's history may hold anything
    # (vLLM pads with any value): masked out
    fill = np.clip(seqlens[:, None] - np.arange(ncols)[None, :] * page_size, 0, page_size)
    reads = np.arange(ncols)[None, :] < hist[:, None]
    held = np.zeros(num_pages, np.int64)
    cols = pt[:, :ncols]
    held[cols[reads & (fill == page_size)]] = page_size  # full history pages: one assignment
    part = reads & (fill < page_size)  # each sequence's last, partial page: at most B entries
    np.maximum.at(held, cols[part].astype(np.int64), fill[part])
    t = np.arange(most)[None, :]
    writes = t < lens[:, None]
    pos = seqlens[:, None] + t  # (B, most) positions written where ``writes``
    page = pt[np.arange(B)[:, None], np.minimum(pos // page_size, width - 1)].astype(np.int64)
    offset = pos % page_size
    bad = writes & (offset < held[np.where(writes, page, 0)])
    if not bad.any():
        return
    b, t = (int(x[0]) for x in np.nonzero(bad))
    p, o = int(page[b, t]), int(offset[b, t])
    b2, j = (int(x[0]) for x in np.nonzero(reads & (cols == p) & (fill > o)))
    whose = "its own" if b2 == b else f"sequence {b2}'s"
    raise ValueError(
        f"sequence {b} would write its new key {t} (position {int(pos[b, t])}) into page {p}, slot {o}, "
        f"which holds {whose} cached key at position {j * page_size + o} (cache_seqlens[{b2}] = "
        f"{int(seqlens[b2])}): page_table[{b}, {int(pos[b, t]) // page_size}] and page_table[{b2}, {j}] "
        f"name the same page; copy the shared page before appending to it (copy on write)"
    )
