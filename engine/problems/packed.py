"""Packed variable-length sequences: FlashAttention's cumulative offsets (``cu_seqlens``), checked
before any kernel runs, shared by ``varlen_attention`` and ``attention_with_kvcache(...,
cu_seqlens_q=)``.

Sequence b of a packed batch holds rows ``cu_seqlens[b] ... cu_seqlens[b + 1] - 1`` of its tensor
(``flash_attn_varlen_func``'s convention): the offsets start at 0, never decrease (a sequence may
be empty) and end at the tensor's row count.
"""

from __future__ import annotations

import numpy as np

from .arrays import host_array

__all__ = ["check_cu_seqlens", "sequence_of_rows", "check_distinct_writes"]


def check_cu_seqlens(cu_seqlens, name: str, total: int, total_name: str, batch: int | None = None) -> np.ndarray:
    """``cu_seqlens`` as an int64 copy of shape ``(B + 1,)``.

    :param total: the packed tensor's row count, which the last offset must equal; ``total_name``
        names that tensor and its shape in the error.
    :param batch: the batch size B the offsets must describe (None: any B >= 0).
    :raises TypeError: not a host array of integers (int32 as FlashAttention, or any integer dtype).
    :raises ValueError: not 1-D, empty, a wrong batch size, a first offset other than 0, a
        decreasing offset, or a last offset other than ``total``; naming the index and values.
    """
    if cu_seqlens is None:
        raise TypeError(f"{name} must be an integer array of shape (B + 1,), got None")
    arr = host_array(cu_seqlens, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int32, as FlashAttention's cu_seqlens), got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B + 1,) with B >= 0 sequences, got shape {tuple(arr.shape)}")
    if batch is not None and arr.shape[0] != batch + 1:
        raise ValueError(f"{name} must have shape (B + 1,) = ({batch + 1},), got {tuple(arr.shape)}")
    cu = arr.astype(np.int64)  # a copy: the caller may change theirs while we hold this one
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {cu[0]}")
    steps = np.diff(cu)
    bad = np.nonzero(steps < 0)[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name} must not decrease (sequence {i} would have a negative length), got "
            f"{name}[{i}] = {cu[i]} and {name}[{i + 1}] = {cu[i + 1]}"
        )
    if cu[-1] != total:
        raise ValueError(
            f"{name} must end at the number of packed rows of {total_name} ({total}), got "
            f"{name}[{len(cu) - 1}] = {cu[-1]}"
        )
    return cu


def sequence_of_rows(cu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(seq, index)``: for every packed row, its sequence b and its index within that sequence."""
    lens = np.diff(cu)
    seq = np.repeat(np.arange(len(lens)), lens)
    return seq, np.arange(int(cu[-1])) - cu[seq]


def check_distinct_writes(page_table: np.ndarray, seq: np.ndarray, pos: np.ndarray, page_size: int) -> None:
    """No two new tokens go to one slot of a paged cache: token ``pos[t]`` of sequence ``seq[t]``
    goes to page ``page_table[seq, pos // page_size]``, offset ``pos % page_size`` (the page
    indices were checked already). ``ValueError`` naming the sequences and the slot."""
    if len(seq) < 2:
        return
    slot = page_table[seq, pos // page_size].astype(np.int64) * page_size + pos % page_size
    uniq, counts = np.unique(slot, return_counts=True)
    if (counts > 1).any():
        s = uniq[counts > 1][0]
        who = sorted({int(b) for b in seq[slot == s]})
        raise ValueError(
            f"sequences {who} would write the same cache slot (page {s // page_size}, offset "
            f"{s % page_size}): their page_table rows share a page where new keys go"
        )
