"""``engine.Variant``: the base class of every attention variant, built-in or third-party."""
from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

__all__ = ["Variant", "check_fits_in_memory"]


def _to_numpy(value, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{what} could not be converted to an array: {exc}") from None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """``MemoryError`` naming ``what`` if ``nbytes`` exceeds the physical memory available now."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > available:
        raise MemoryError(f"{what} would need {nbytes / 2**30:.1f} GiB but only "
                          f"{available / 2**30:.1f} GiB of memory is available")


class Variant:
    """An attention layer selected by name: ``engine.get_variant(name, **params)``.

    Subclasses declare the class attributes ``name`` and ``description``, register their
    parameters in ``__init__`` with :meth:`register_parameter`, and implement :meth:`forward`.
    Calls follow ``torch.nn.MultiheadAttention(batch_first=True)``: inputs ``(N, L, E)`` or
    unbatched ``(L, E)``; boolean masks True = **not allowed**; the result is always
    ``(output, weights_or_None)``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, *, dtype=np.float32, seed=None):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.rng = np.random.default_rng(seed)
        self._params: dict[str, np.ndarray] = {}

    # -- parameters ---------------------------------------------------------------------------
    def register_parameter(self, key: str, value: np.ndarray) -> None:
        """Declare a parameter under its torch name (``state_dict`` key)."""
        self._params[key] = np.ascontiguousarray(value, dtype=self.dtype)

    def param(self, key: str) -> np.ndarray:
        """The current value of a parameter (no copy)."""
        return self._params[key]

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, as NumPy arrays under torch's names."""
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, state) -> None:
        """Load parameters from a mapping of NumPy arrays or torch tensors (all or nothing).

        Values are cast to the variant's dtype. Missing or unexpected keys, wrong shapes and
        non-floating values raise ``ValueError``/``TypeError`` naming them.
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        missing = sorted(set(self._params) - set(state))
        unexpected = sorted(set(state) - set(self._params))
        if missing or unexpected:
            raise ValueError(f"state_dict for {self.name!r} has missing keys {missing} and "
                             f"unexpected keys {unexpected}")
        loaded = {}
        for key, expected in self._params.items():
            arr = _to_numpy(state[key], f"state_dict[{key!r}]")
            if arr.dtype.kind != "f":
                raise TypeError(f"state_dict[{key!r}] must be floating, got dtype {arr.dtype}")
            if arr.shape != expected.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {arr.shape}, expected {expected.shape}")
            loaded[key] = np.ascontiguousarray(arr, dtype=self.dtype)
        self._params.update(loaded)

    # -- calling ------------------------------------------------------------------------------
    def _input(self, x, name: str) -> np.ndarray:
        arr = _to_numpy(x, name)
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be floating, got dtype {arr.dtype} with shape {arr.shape}")
        if arr.ndim not in (2, 3):
            raise ValueError(f"{name} must be (N, L, features) or unbatched (L, features), got shape {arr.shape}")
        return np.asarray(arr, dtype=self.dtype)

    def __call__(self, query, key=None, value=None, *, attn_mask=None, key_padding_mask=None,
                 need_weights=False, average_attn_weights=True, is_causal=False, backend="auto",
                 **variant_kwargs):
        """Attend; returns ``(output, weights)`` with ``weights`` None unless ``need_weights``.

        ``key`` defaults to ``query`` and ``value`` to ``key``. ``variant_kwargs`` are keywords
        of a particular variant (e.g. ``document_ids`` of ``document``), passed to ``forward``. Output is ``(N, L, E)`` (or
        ``(L, E)``); weights ``(N, L, S)`` averaged over heads, or ``(N, heads, L, S)``.
        """
        q = self._input(query, "query")
        k = q if key is None else self._input(key, "key")
        v = k if value is None else self._input(value, "value")
        if not q.ndim == k.ndim == v.ndim:
            raise ValueError(f"query, key and value must all be batched or all unbatched, got shapes "
                             f"{q.shape}, {k.shape}, {v.shape}")
        unbatched = q.ndim == 2
        if unbatched:
            q, k, v = q[None], k[None], v[None]
            if key_padding_mask is not None:
                key_padding_mask = np.asarray(key_padding_mask)[None]
        if k.shape[:2] != v.shape[:2] or k.shape[0] != q.shape[0]:
            raise ValueError(f"query (N, L, E), key (N, S, kdim) and value (N, S, vdim) disagree on N "
                             f"or S: {q.shape}, {k.shape}, {v.shape}")
        out, weights = self.forward(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                    need_weights=bool(need_weights),
                                    average_attn_weights=bool(average_attn_weights),
                                    is_causal=bool(is_causal), backend=backend, **variant_kwargs)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[0]
        return out, weights

    def forward(self, query, key, value, *, attn_mask, key_padding_mask, need_weights,
                average_attn_weights, is_causal, backend):
        """Batched inputs ``(N, L, E)``, ``(N, S, kdim)``, ``(N, S, vdim)`` in ``self.dtype``;
        returns ``(output, weights_or_None)``. Subclasses implement this."""
        raise NotImplementedError

    # -- for tests and benchmarks that cover every registered variant --------------------------
    @classmethod
    def example_params(cls, embed_dim: int = 64, num_heads: int = 8) -> dict:
        """Constructor parameters for a layer of about this size (tests and benchmarks use them)."""
        return {"embed_dim": embed_dim, "num_heads": num_heads}

    def example_inputs(self, batch: int, length: int, key_length: int | None = None, rng=None) -> dict:
        """Keyword arguments for one call on random inputs of this size (self-attention here)."""
        rng = np.random.default_rng(rng)
        return {"query": rng.standard_normal((batch, length, self.embed_dim)).astype(self.dtype)}
