"""``multi-head``: ``torch.nn.MultiheadAttention(batch_first=True)`` on the engine's backends."""
from __future__ import annotations

import math

import numpy as np

from engine import Variant, hookimpl
from engine.array_library import Placement, placement_of, to_host
from engine.materialised import attention_probabilities
from engine.masks import mha_masks_to_sdpa
from engine.validation import validate_attention_args
from engine.variant import check_fits_in_memory


class MultiHeadAttention(Variant):
    """Project, split into heads, attend on an engine backend, concatenate, project.

    Parameters have torch's names and shapes (``y = x @ W.T + b``): ``in_proj_weight`` (3E, E) and
    ``in_proj_bias`` (3E,), or ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim),
    ``v_proj_weight`` (E, vdim) when ``kdim``/``vdim`` differ from ``embed_dim``; then
    ``out_proj.weight`` (E, E) and ``out_proj.bias`` (E,). Initialisation follows torch: Xavier
    uniform projections, zero biases, ``out_proj.weight`` uniform in +-1/sqrt(E).

    ``forward`` uses array-API calls only, so torch CUDA tensors and CuPy arrays are projected on
    their GPU (weights copied there once) and attend on the ``cuda`` backend in place.
    """

    name = "multi-head"
    description = "nn.MultiheadAttention: per-head scaled dot-product attention, concat, output projection"
    out_projection = True
    device_arrays = True

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool = True, kdim: int | None = None,
                 vdim: int | None = None, dtype=np.float32, seed=None):
        super().__init__(dtype=dtype, seed=seed)
        for argname, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{argname} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        if self.kdim < 1 or self.vdim < 1:
            raise ValueError(f"kdim and vdim must be positive, got {kdim!r}, {vdim!r}")
        self.bias = bool(bias)
        self.same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        E = self.embed_dim
        self._init_projections()
        if self.out_projection:
            bound = 1.0 / math.sqrt(E)
            self.register_parameter("out_proj.weight", self.rng.uniform(-bound, bound, (E, E)))
            if self.bias:
                self.register_parameter("out_proj.bias", np.zeros(E))

    def _init_projections(self) -> None:
        """Register the input projections (torch's names and initialisation)."""
        E = self.embed_dim
        if self.same_embed_dim:
            self.register_parameter("in_proj_weight", self._xavier(3 * E, E))
        else:
            self.register_parameter("q_proj_weight", self._xavier(E, E))
            self.register_parameter("k_proj_weight", self._xavier(E, self.kdim))
            self.register_parameter("v_proj_weight", self._xavier(E, self.vdim))
        if self.bias:
            self.register_parameter("in_proj_bias", np.zeros(3 * E))

    def _xavier(self, fan_out: int, fan_in: int) -> np.ndarray:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng.uniform(-bound, bound, (fan_out, fan_in))

    def projection_weights(self, like=None):
        """``(Wq, Wk, Wv, bq, bk, bv)`` with biases None when ``bias=False``; NumPy, or in the
        library and on the device of ``like`` (see ``Variant.param``)."""
        E = self.embed_dim
        if self.same_embed_dim:
            w = self.param("in_proj_weight", like)
            ws = (w[:E, ...], w[E:2 * E, ...], w[2 * E:, ...])
        else:
            ws = tuple(self.param(n, like) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        if self.bias:
            b = self.param("in_proj_bias", like)
            return ws + (b[:E], b[E:2 * E], b[2 * E:])
        return ws + (None, None, None)

    def _heads(self, x, w, b, name, xp):
        """(N, T, d_in) @ W.T + b -> (N, W.shape[0] // head_dim, T, head_dim)."""
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"{name} has {x.shape[-1]} features, expected {w.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        y = x @ w.T
        if b is not None:
            y += b
        N, T, _ = y.shape
        return xp.permute_dims(xp.reshape(y, (N, T, -1, self.head_dim)), (0, 2, 1, 3))

    def attention_mods(self, N: int, L: int, S: int, **call_kwargs) -> dict:
        """Extra ``scaled_dot_product_attention`` arguments (``score_mod``, ``mask_mod``,
        ``mod_args``, ``block_mask``, ``enable_gqa``) for this variant; none for plain multi-head.
        Subclasses built on mods override this; ``call_kwargs`` are the variant's own call keywords."""
        if call_kwargs:
            raise TypeError(f"{self.name!r} got unexpected keyword arguments {sorted(call_kwargs)}")
        return {}

    def forward(self, query, key, value, *, attn_mask, key_padding_mask, need_weights,
                average_attn_weights, is_causal, backend, **call_kwargs):
        place = placement_of(query)  # NumPy, or the caller's GPU library: everything stays there
        xp = place.xp
        wq, wk, wv, bq, bk, bv = self.projection_weights(like=query)
        q = self._heads(query, wq, bq, "query", xp)
        k = self._heads(key, wk, bk, "key", xp)
        v = self._heads(value, wv, bv, "value", xp)
        N, H, L, _ = q.shape
        S = k.shape[2]
        mask, causal = mha_masks_to_sdpa(attn_mask, key_padding_mask, is_causal, N, H, L, S, self.dtype,
                                         place)
        extra = self.attention_mods(N, L, S, **call_kwargs)
        if place.is_numpy and "mod_args" in extra:  # the cpu kernels take host arrays only
            extra["mod_args"] = tuple(to_host(a) for a in extra["mod_args"])
        weights = None
        if need_weights:  # materialises (N, H, L, S): checked before anything is allocated
            check_fits_in_memory(N * H * L * S * 8 * 3, f"need_weights=True for (N, heads, L, S) = "
                                 f"{(N, H, L, S)}")
            weights = self._weights(q, k, v, mask, causal, extra, average_attn_weights, place)
        out = self.attention(q, k, v, attn_mask=mask, is_causal=causal, backend=backend, **extra)
        out = xp.reshape(xp.permute_dims(place.put(out), (0, 2, 1, 3)), (N, L, self.embed_dim))
        if self.out_projection:
            out = out @ self.param("out_proj.weight", like=query).T
            if self.bias:
                out += self.param("out_proj.bias", like=query)
        return out, weights

    @staticmethod
    def _weights(q, k, v, mask, causal, extra, average, place: Placement):
        """The (N, H, L, S) probabilities (or their mean over heads), from the NumPy oracle on host
        copies of the projected inputs: a mod is Numba code, so only the host can evaluate it here."""
        host = [to_host(a) for a in (q, k, v)]
        host_extra = dict(extra)
        if "mod_args" in extra:
            host_extra["mod_args"] = tuple(to_host(a) for a in extra["mod_args"])
        problem = validate_attention_args(*host, None if mask is None else to_host(mask), causal, **host_extra)
        weights = attention_probabilities(problem)
        if average:
            weights = weights.mean(axis=1)
        return place.put(weights)


@hookimpl
def attention_variants():
    return [MultiHeadAttention]

