"""Causal masks described by their alignment instead of an L x S array (torch's ``CausalBias``).

``causal_lower_right(L, S)`` is the mask of decoding and chunked prefill: the last query row sees
every key, so query ``i`` sees keys ``j <= i + (S - L)``. It is passed as ``attn_mask`` to
``engine.scaled_dot_product_attention``; validation turns it into a causal flag with a diagonal
offset, which the kernels apply tile by tile (no L x S mask is built). Rows with no visible key
(``i < L - S``) give zeros and ``lse = -inf``, as torch does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CausalBias", "causal_lower_right", "causal_upper_left"]

UPPER_LEFT, LOWER_RIGHT = "upper_left", "lower_right"


class CausalBias:
    """A causal mask of ``seq_len_q`` query rows and ``seq_len_kv`` keys, aligned at the top left
    (row i sees keys j <= i, as ``is_causal=True``) or at the bottom right (j <= i + S - L).

    Semantics of ``torch.nn.attention.bias.CausalBias``; create it with
    :func:`causal_lower_right` or :func:`causal_upper_left`. Immutable.
    """

    __slots__ = ("variant", "seq_len_q", "seq_len_kv")

    def __init__(self, variant: str, seq_len_q: int, seq_len_kv: int):
        if variant not in (UPPER_LEFT, LOWER_RIGHT):
            raise ValueError(f"variant must be {UPPER_LEFT!r} or {LOWER_RIGHT!r}, got {variant!r}")
        for name, n in (("seq_len_q", seq_len_q), ("seq_len_kv", seq_len_kv)):
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        object.__setattr__(self, "variant", variant)
        object.__setattr__(self, "seq_len_q", int(seq_len_q))
        object.__setattr__(self, "seq_len_kv", int(seq_len_kv))

    def __setattr__(self, name, value):
        raise AttributeError("CausalBias is immutable")

    @property
    def shape(self) -> tuple:
        """``(L, S)``: the score shape this mask is for."""
        return (self.seq_len_q, self.seq_len_kv)

    @property
    def diagonal_offset(self) -> int:
        """``d`` such that query i sees keys j <= i + d: 0 (top left) or S - L (bottom right)."""
        return 0 if self.variant == UPPER_LEFT else self.seq_len_kv - self.seq_len_q

    def materialize(self) -> np.ndarray:
        """The boolean (L, S) array, True = may attend (for backends that need an array)."""
        return np.tri(self.seq_len_q, self.seq_len_kv, k=self.diagonal_offset, dtype=bool)

    def __eq__(self, other):
        return isinstance(other, CausalBias) and (self.variant, self.shape) == (other.variant, other.shape)

    def __hash__(self):
        return hash((self.variant, self.shape))

    def __repr__(self):
        return f"CausalBias({self.variant!r}, seq_len_q={self.seq_len_q}, seq_len_kv={self.seq_len_kv})"


def causal_lower_right(seq_len_q: int, seq_len_kv: int) -> CausalBias:
    """Causal mask aligned at the bottom right: query i sees keys ``j <= i + seq_len_kv - seq_len_q``.

    Usable as ``attn_mask`` in ``engine.scaled_dot_product_attention`` (torch's
    ``torch.nn.attention.bias.causal_lower_right``). With L > S the first L - S rows see no key and
    give zeros. ``ValueError`` for a negative or non-integer size.

    :param seq_len_q: L, the query rows.
    :param seq_len_kv: S, the keys.
    """
    return CausalBias(LOWER_RIGHT, seq_len_q, seq_len_kv)


def causal_upper_left(seq_len_q: int, seq_len_kv: int) -> CausalBias:
    """Causal mask aligned at the top left (row i sees keys j <= i): the same as ``is_causal=True``."""
    return CausalBias(UPPER_LEFT, seq_len_q, seq_len_kv)


def as_causal_bias(mask) -> CausalBias | None:
    """``mask`` as a :class:`CausalBias` if it is one (ours, or torch's ``CausalBias``, recognised
    without importing torch), else ``None``."""
    if isinstance(mask, CausalBias):
        return mask
    if type(mask).__name__ == "CausalBias" and type(mask).__module__.startswith("torch"):
        variant = getattr(mask, "variant", None)
        variant = str(getattr(variant, "name", variant)).lower()  # an IntEnum: its name, not "2"
        kind = LOWER_RIGHT if "lower_right" in variant else UPPER_LEFT if "upper_left" in variant else None
        if kind is not None:
            return CausalBias(kind, mask.seq_len_q, mask.seq_len_kv)
    return None
