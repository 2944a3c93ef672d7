"""The tiled flash-attention forward kernel of the ``cpu`` backend.

One parallel task per (batch, query head, query tile). Each task walks the key tiles, computes the
tile of scores with BLAS (``np.dot`` on contiguous blocks), and folds it into a running row
maximum, running sum and output accumulator (online softmax), so no L x S matrix ever exists:
working memory is O(tile) per task and the output is the only O(L) allocation.
"""
import math

import numpy as np
from numba import njit, prange

from ..jit_cache import cache_enabled
from .fastexp import exp_shifted

_CACHE = cache_enabled()

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


@njit(parallel=True, cache=_CACHE)
def _flash_forward(q, k, v, mask, mask_batch, mask_kind, causal, scale, group,
                   block_q, block_k, bits, out, lse):
    """out[b, h] = softmax(scale * q[b, h] @ k[b, h // group].T + mask) @ v[b, h // group].

    q (B, Hq, L, E), k (B, H, S, E), v (B, H, S, Ev), out (B, Hq, L, Ev), lse (B, Hq, L): C order.
    ``mask`` (Bm, Hq, L, S) may be a zero-stride view; ``mask_batch[b]`` selects its first index.
    ``mask_kind``: MASK_NONE, MASK_BOOL (True = may attend) or MASK_FLOAT (added).
    ``causal``: top-left, row i sees keys j <= i; key tiles right of the diagonal are skipped.
    ``bits``: (tasks, block_k) integer scratch for the exp kernel. Rows with no visible key get
    zeros and lse = -inf; NaN scores propagate to their rows.
    """
    B, Hq, L, E = q.shape
    S = k.shape[2]
    Ev = v.shape[3]
    nqb = (L + block_q - 1) // block_q
    neg_inf = -np.inf
    for task in prange(B * Hq * nqb):
        b = task // (Hq * nqb)
        rest = task - b * (Hq * nqb)
        h = rest // nqb
        i0 = (rest - h * nqb) * block_q
        i1 = min(i0 + block_q, L)
        nq = i1 - i0
        hk = h // group
        mb = mask_batch[b]
        scratch = bits[task]
        qblk = q[b, h, i0:i1]  # no trailing ":": Numba then types the tile C-contiguous
        acc = np.zeros((nq, Ev), dtype=out.dtype)
        row_max = np.full(nq, neg_inf, dtype=out.dtype)
        row_sum = np.zeros(nq, dtype=out.dtype)
        kend = min(S, i1) if causal else S
        for j0 in range(0, kend, block_k):
            j1 = min(j0 + block_k, kend)
            nk = j1 - j0
            s = np.dot(qblk, k[b, hk, j0:j1].T)
            on_diagonal = causal and j1 - 1 > i0
            for r in range(nq):
                i = i0 + r
                row = s[r]
                mx = row_max[r]
                nan_seen = False
                for c in range(nk):
                    t = row[c] * scale
                    if mask_kind == MASK_FLOAT:
                        t += mask[mb, h, i, j0 + c]
                    elif mask_kind == MASK_BOOL:
                        if not mask[mb, h, i, j0 + c]:
                            t = neg_inf
                    if on_diagonal and j0 + c > i:
                        t = neg_inf
                    row[c] = t
                    nan_seen |= t != t
                    mx = t if t > mx else mx
                if nan_seen:
                    mx = np.nan
                if mx == neg_inf:  # nothing visible in this row yet: contributes nothing
                    row[:] = 0.0
                    continue
                alpha = math.exp(row_max[r] - mx)  # 0 when the row had nothing before
                exp_shifted(row, mx, scratch)
                row_sum[r] = row_sum[r] * alpha + np.sum(row)
                if alpha != 1.0:
                    for c in range(Ev):
                        acc[r, c] *= alpha
                row_max[r] = mx
            acc += np.dot(s, v[b, hk, j0:j1])
        for r in range(nq):
            total = row_sum[r]
            if total > 0.0 or total != total:
                inv = 1.0 / total
                for c in range(Ev):
                    out[b, h, i0 + r, c] = acc[r, c] * inv
                lse[b, h, i0 + r] = row_max[r] + math.log(total)
            else:
                out[b, h, i0 + r, :] = 0.0
                lse[b, h, i0 + r] = neg_inf
