"""``engine.Variant``: the base class of every attention variant, built-in or third-party."""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from .problems.arrays import (
    HOST,
    Placement,
    bfloat16_dtype,
    input_placement,
    is_bfloat16,
    is_floating,
    placement_of,
    to_host,
    to_numpy,
)

__all__ = ["Variant", "check_fits_in_memory", "variant_dtype"]


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """``MemoryError`` naming ``what`` if ``nbytes`` exceeds the physical memory available now."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > available:
        raise MemoryError(
            f"{what} would need {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is available"
        )


class Variant:
    """An attention layer selected by name: ``engine.get_variant(name, **params)``.

    Subclasses declare the class attributes ``name`` and ``description``, register their
    parameters in ``__init__`` with :meth:`register_parameter`, and implement :meth:`forward`.
    Calls follow ``torch.nn.MultiheadAttention(batch_first=True)``: inputs ``(N, L, E)`` or
    unbatched ``(L, E)``; boolean masks True = **not allowed**; the result is always
    ``(output, weights_or_None)``. A variant built with ``batch_first=False`` takes and returns
    ``(L, N, E)`` instead (torch's default layout); masks and weights keep their shapes.

    :param dtype: the parameters' and results' dtype: float32 (default), float64, float16 or
        bfloat16, as a NumPy dtype, its name or a torch dtype.
    :type dtype: dtype | str | torch.dtype
    :param seed: seeds the parameters' initialisation (``numpy.random.default_rng``).
    :type seed: int | None
    :param batch_first: inputs and outputs ``(N, L, E)`` (default) or, False, ``(L, N, E)`` as
        torch's default.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True when ``forward`` computes in the array library of its inputs (array-API calls and
    #: ``param(key, like=x)`` only), so torch CUDA tensors and CuPy arrays stay on their GPU.
    #: When False, device inputs are copied to the host, ``forward`` runs on NumPy, and the
    #: results are copied back to the inputs' device in their library.
    device_arrays: ClassVar[bool] = False

    def __init__(self, *, dtype=np.float32, seed=None, batch_first: bool = True):
        dtype = variant_dtype(dtype)
        if not isinstance(batch_first, (bool, np.bool_)):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
        self.dtype = dtype
        self.batch_first = bool(batch_first)
        self.rng = np.random.default_rng(seed)
        self._params: dict[str, np.ndarray] = {}
        # parameters copied to devices: {placement key: (the _params dict they came from, {key: array})}
        self._placed: dict[tuple, tuple] = {}

    @property
    def compute_dtype(self) -> np.dtype:
        """The dtype host arithmetic runs in: ``dtype``, or float32 for a float16/bfloat16 layer
        (whose projections accumulate in float32 and round once, as torch's CPU kernels do; use it
        for ``mod_args`` values, which Numba cannot take in bfloat16)."""
        return np.dtype(np.float32) if self.dtype.itemsize == 2 else self.dtype

    # -- parameters ---------------------------------------------------------------------------
    def register_parameter(self, key: str, value: np.ndarray) -> None:
        """Declare a parameter under its torch name (``state_dict`` key).

        :param key: its ``state_dict`` key (torch's name).
        :param value: its initial value, cast to the variant's dtype.
        """
        # a new dict, never an update in place: device copies cached from the old one go stale
        self._params = {**self._params, key: np.ascontiguousarray(value, dtype=self.dtype)}

    def param(self, key: str, like=None):
        """The current value of a parameter: the NumPy array itself (no copy), or, with ``like``
        an array of another library or device, a copy there (made once, reused until the
        parameters change through ``load_state_dict``).

        :param key: the parameter's ``state_dict`` key.
        :param like: an array of the library and device to return the value in, or None for NumPy.
        :type like: array | None
        """
        params = self._params
        if like is None or isinstance(like, np.ndarray):
            return params[key]
        place = placement_of(like)
        if place.is_numpy:
            return params[key]
        cached = self._placed.get(place.key())
        if cached is None or cached[0] is not params:
            cached = self._placed[place.key()] = (params, {})
        arr = cached[1].get(key)
        if arr is None:
            arr = cached[1][key] = place.put(params[key])
        return arr

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter, as NumPy arrays under torch's names."""
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, state) -> None:
        """Load parameters from a mapping of NumPy arrays, torch tensors or CuPy arrays (all or nothing).

        Values are cast to the variant's dtype. Missing or unexpected keys, wrong shapes and
        non-floating values raise ``ValueError``/``TypeError`` naming them.

        :param state: parameter name -> value (NumPy arrays, torch tensors or CuPy arrays).
        :type state: Mapping[str, array]
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        missing = sorted(set(self._params) - set(state))
        unexpected = sorted(set(state) - set(self._params))
        if missing or unexpected:
            raise ValueError(
                f"state_dict for {self.name!r} has missing keys {missing} and unexpected keys {unexpected}"
            )
        loaded = {}
        for key, expected in self._params.items():
            arr = to_numpy(state[key], f"state_dict[{key!r}]")
            if not is_floating(arr.dtype):
                raise TypeError(f"state_dict[{key!r}] must be floating, got dtype {arr.dtype}")
            if arr.shape != expected.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {arr.shape}, expected {expected.shape}")
            loaded[key] = np.ascontiguousarray(arr, dtype=self.dtype)
        self._params = {**self._params, **loaded}

    # -- calling ------------------------------------------------------------------------------
    def _input(self, x, name: str, place: Placement):
        """A batched or unbatched floating input, in ``self.dtype``, in ``place``'s library."""
        if place.is_numpy:
            arr = to_numpy(x, name)
            if not is_floating(arr.dtype):
                raise TypeError(f"{name} must be floating, got dtype {arr.dtype} with shape {arr.shape}")
            if arr.ndim not in (2, 3):
                raise ValueError(f"{name} must be (N, L, features) or unbatched (L, features), got shape {arr.shape}")
            return np.asarray(arr, dtype=self.dtype)
        if not place.xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"{name} must be floating, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if x.ndim not in (2, 3):
            raise ValueError(f"{name} must be (N, L, features) or unbatched (L, features), got shape {tuple(x.shape)}")
        return place.put(x, self.dtype, name)

    def __call__(
        self,
        query,
        key=None,
        value=None,
        *,
        attn_mask=None,
        key_padding_mask=None,
        need_weights=False,
        average_attn_weights=True,
        is_causal=False,
        backend="auto",
        **variant_kwargs,
    ):
        """Attend; returns ``(output, weights)`` with ``weights`` None unless ``need_weights``.

        ``key`` defaults to ``query`` and ``value`` to ``key``. ``variant_kwargs`` are keywords
        of a particular variant (e.g. ``document_ids`` of ``document``), passed to ``forward``. Output is
        ``(N, L, E)`` (or
        ``(L, E)``); weights ``(N, L, S)`` averaged over heads, or ``(N, heads, L, S)``.

        Host inputs (NumPy, torch CPU tensors) give NumPy results. torch CUDA tensors and CuPy
        arrays give results of their own library on their device: computed there when the variant
        declares ``device_arrays`` (the built-in ones do; ``backend="auto"`` then picks ``cuda``),
        else through host copies. Masks may be host arrays (copied over) or on the query's device.

        :param query: ``(N, L, E)``, or unbatched ``(L, E)`` (``(L, N, E)`` with
            ``batch_first=False``).
        :type query: array
        :param key: ``(N, S, kdim)``; None is ``query``.
        :type key: array | None
        :param value: ``(N, S, vdim)``; None is ``key``.
        :type value: array | None
        :param attn_mask: ``(L, S)`` or ``(N * heads, L, S)``: boolean, True = **not** allowed, or
            floating, added.
        :type attn_mask: array | None
        :param key_padding_mask: ``(N, S)``: boolean, True = ignore that key, or floating, added.
        :type key_padding_mask: array | None
        :param need_weights: also return the attention weights (materialised).
        :type need_weights: bool
        :param average_attn_weights: average the weights over heads.
        :type average_attn_weights: bool
        :param is_causal: apply the causal mask (combined with any other mask).
        :type is_causal: bool
        :param backend: ``"auto"`` or a backend name.
        :type backend: str
        :param variant_kwargs: keywords of a particular variant (``document_ids``, ``static_k``...).
        :type variant_kwargs: Any
        """
        place = self.input_placement(query, "query")
        for name, x in (("key", key), ("value", value)):
            if x is not None and self.input_placement(x, name) != place:
                where = self.input_placement(x, name)
                raise TypeError(
                    f"{name} is on {_describe(where)} but query is on {_describe(place)}; "
                    f"pass query, key and value from one library and device"
                )
        run = place if self.device_arrays else HOST
        if run is not place:  # a variant that computes in NumPy: device values become host copies
            attn_mask, key_padding_mask = to_host(attn_mask), to_host(key_padding_mask)
            variant_kwargs = {k: to_host(v) for k, v in variant_kwargs.items()}
        q = self._input(query, "query", run)
        k = q if key is None else self._input(key, "key", run)
        v = k if value is None else self._input(value, "value", run)
        if not q.ndim == k.ndim == v.ndim:
            raise ValueError(
                f"query, key and value must all be batched or all unbatched, got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        unbatched = q.ndim == 2
        # (L, N, E) -> (N, L, E): forward always sees batch first (a view; no copy)
        seq_first = not unbatched and not self.batch_first
        if seq_first:
            q, k, v = (run.xp.permute_dims(a, (1, 0, 2)) for a in (q, k, v))
        if unbatched:
            q, k, v = q[None, ...], k[None, ...], v[None, ...]
            if key_padding_mask is not None:
                key_padding_mask = run.put(key_padding_mask, what="key_padding_mask")[None, ...]
        if k.shape[:2] != v.shape[:2] or k.shape[0] != q.shape[0]:
            raise ValueError(
                f"query (N, L, E), key (N, S, kdim) and value (N, S, vdim) disagree on N "
                f"or S: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        out, weights = self.forward(
            q,
            k,
            v,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=bool(need_weights),
            average_attn_weights=bool(average_attn_weights),
            is_causal=bool(is_causal),
            backend=backend,
            **variant_kwargs,
        )
        if unbatched:
            out = out[0, ...]
            weights = None if weights is None else weights[0, ...]
        if seq_first:
            out = run.xp.permute_dims(out, (1, 0, 2))
        if run is not place:  # computed on the host for device inputs: the results go back
            out = place.put(out)
            weights = None if weights is None else place.put(weights)
        return out, weights

    # -- hooks that engine.torch.as_module rebinds to train through torch autograd ------------------
    def input_placement(self, x, name: str) -> Placement:
        """Where this variant computes on input ``x`` (``engine.problems.arrays.input_placement``:
        NumPy for host inputs, the library and device of GPU arrays).

        :param x: an input.
        :type x: array
        :param name: its name, for errors.
        """
        return input_placement(x, name)

    # -- array helpers for forward() (the array-API namespace and device of the inputs) ---------------
    @staticmethod
    def placement_of(x) -> Placement:
        """The array namespace and device of ``x`` (``x.xp`` is NumPy's array-API namespace for
        host arrays, torch's or CuPy's for theirs): where ``forward`` computes.

        :param x: an array.
        :type x: array
        """
        return placement_of(x)

    @staticmethod
    def to_host(value):
        """A NumPy copy of an array of another library or device; NumPy arrays, scalars and
        anything that is not an array come back as they are.

        :param value: an array or any other value.
        :type value: Any
        """
        return to_host(value)

    @staticmethod
    def check_fits_in_memory(nbytes: int, what: str) -> None:
        """``MemoryError`` naming ``what`` if ``nbytes`` exceeds the memory available now (check
        before materialising something quadratic, such as ``need_weights=True``).

        :param nbytes: bytes about to be allocated.
        :param what: what they are for, for the error.
        """
        check_fits_in_memory(nbytes, what)

    def attention(self, query, key, value, **kwargs):
        """The attention between the projections: ``engine.scaled_dot_product_attention`` with
        these arguments. ``forward`` calls attention through this method, so that
        ``engine.torch.as_module`` can route it through torch autograd.

        :param query: ``(N, heads, L, head_dim)`` projections.
        :type query: array
        :param key: ``(N, kv_heads, S, head_dim)``.
        :type key: array
        :param value: ``(N, kv_heads, S, head_dim_v)``.
        :type value: array
        :param kwargs: ``engine.scaled_dot_product_attention``'s keywords.
        :type kwargs: Any
        """
        from .functional import scaled_dot_product_attention

        return scaled_dot_product_attention(query, key, value, **kwargs)

    def forward(
        self, query, key, value, *, attn_mask, key_padding_mask, need_weights, average_attn_weights, is_causal, backend
    ):
        """Batched inputs ``(N, L, E)``, ``(N, S, kdim)``, ``(N, S, vdim)`` in ``self.dtype``;
        returns ``(output, weights_or_None)``. Subclasses implement this.

        The inputs are NumPy arrays, or, for a variant with ``device_arrays = True``, arrays of the
        caller's library on its device (torch CUDA, CuPy); the masks are as the caller passed them.
        A variant that computes with array-API calls, reads its parameters with
        ``self.param(key, like=x)`` and attends with :meth:`attention` can be trained through
        ``engine.torch.as_module``.

        :param query: ``(N, L, E)`` in ``self.dtype``.
        :type query: array
        :param key: ``(N, S, kdim)``.
        :type key: array
        :param value: ``(N, S, vdim)``.
        :type value: array
        :param attn_mask: as the caller passed it.
        :type attn_mask: array | None
        :param key_padding_mask: as the caller passed it (batched).
        :type key_padding_mask: array | None
        :param need_weights: whether to return the weights.
        :type need_weights: bool
        :param average_attn_weights: average them over heads.
        :type average_attn_weights: bool
        :param is_causal: the caller's flag.
        :type is_causal: bool
        :param backend: the caller's backend.
        :type backend: str
        """
        raise NotImplementedError

    # -- for tests and benchmarks that cover every registered variant --------------------------
    @classmethod
    def example_params(cls, embed_dim: int = 64, num_heads: int = 8) -> dict:
        """Constructor parameters for a layer of about this size (tests and benchmarks use them).

        :param embed_dim: embedding size.
        :param num_heads: heads.
        """
        return {"embed_dim": embed_dim, "num_heads": num_heads}

    def example_inputs(self, batch: int, length: int, key_length: int | None = None, rng=None) -> dict:
        """Keyword arguments for one call on random inputs of this size (self-attention here).

        :param batch: N.
        :param length: L.
        :param key_length: S for variants that take keys of their own (None: L).
        :param rng: seed or generator.
        :type rng: int | numpy.random.Generator | None
        """
        rng = np.random.default_rng(rng)
        return {"query": rng.standard_normal((batch, length, self.embed_dim)).astype(self.dtype)}


def variant_dtype(dtype) -> np.dtype:
    """The layer dtype: float32, float64, float16 or bfloat16 (ml_dtypes'), given as a NumPy
    dtype, its name, or a torch dtype (``torch.float16``, as ``nn.MultiheadAttention(dtype=...)``)."""
    name = str(dtype).removeprefix("torch.") if type(dtype).__module__.startswith("torch") else dtype
    if isinstance(name, str) and name == "bfloat16" or getattr(name, "__name__", None) == "bfloat16":
        return bfloat16_dtype()
    try:
        dt = np.dtype(name)
    except TypeError:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
    if not (dt in (np.float16, np.float32, np.float64) or is_bfloat16(dt)):
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dt}")
    return dt


def _describe(place: Placement) -> str:
    return "the host (NumPy)" if place.is_numpy else f"{place.xp.__name__.split('.')[-1]} device {place.device}"
