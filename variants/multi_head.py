"""``multi-head``: ``torch.nn.MultiheadAttention(batch_first=True)`` on the engine's backends."""

from __future__ import annotations

import math

import numpy as np

from engine import Variant, attention_weights, hookimpl, mha_masks_to_sdpa


class MultiHeadAttention(Variant):
    """Project, split into heads, attend on an engine backend, concatenate, project.

    Parameters have torch's names and shapes (``y = x @ W.T + b``): ``in_proj_weight`` (3E, E) and
    ``in_proj_bias`` (3E,), or ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim),
    ``v_proj_weight`` (E, vdim) when ``kdim``/``vdim`` differ from ``embed_dim``; then
    ``out_proj.weight`` (E, E) and ``out_proj.bias`` (E,). Initialisation follows torch: Xavier
    uniform projections, zero biases, ``out_proj.weight`` uniform in +-1/sqrt(E).

    ``add_bias_kv=True`` adds the parameters ``bias_k`` and ``bias_v`` (1, 1, E), appended to the
    projected keys and values as one more key; ``add_zero_attn=True`` appends a key and value of
    zeros after that (both as torch). ``batch_first=False`` takes and returns torch's default
    ``(L, N, E)`` layout (this engine's default is ``batch_first=True``). The appended keys are
    visible to every query whatever the masks (torch pads its masks with a visible column) and
    are not seen by a variant's ``score_mod``/``mask_mod``, which describe the sequence's own keys;
    their contribution is merged with the attention over the sequence through its log-sum-exp.

    ``forward`` uses array-API calls only, so torch CUDA tensors and CuPy arrays are projected on
    their GPU (weights copied there once) and attend on the ``cuda`` backend in place.
    """

    name = "multi-head"
    description = "nn.MultiheadAttention: per-head scaled dot-product attention, concat, output projection"
    out_projection = True
    device_arrays = True

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        dtype=np.float32,
        seed=None,
    ):
        super().__init__(dtype=dtype, seed=seed, batch_first=batch_first)
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
        self.add_bias_kv = bool(add_bias_kv)
        self.add_zero_attn = bool(add_zero_attn)
        self.same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        E = self.embed_dim
        self._init_projections()
        if self.add_bias_kv:  # torch: xavier_normal_ on (1, 1, width), so std = sqrt(1 / width)
            width = self.kv_width
            for key in ("bias_k", "bias_v"):
                self.register_parameter(key, self.rng.normal(0.0, math.sqrt(1.0 / width), (1, 1, width)))
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

    @property
    def kv_width(self) -> int:
        """Features of the projected keys and values (``embed_dim``; fewer heads' worth with GQA)."""
        return self.embed_dim

    def _xavier(self, fan_out: int, fan_in: int) -> np.ndarray:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng.uniform(-bound, bound, (fan_out, fan_in))

    def projection_weights(self, like=None):
        """``(Wq, Wk, Wv, bq, bk, bv)`` with biases None when ``bias=False``; NumPy, or in the
        library and on the device of ``like`` (see ``Variant.param``)."""
        E = self.embed_dim
        if self.same_embed_dim:
            w = self.param("in_proj_weight", like)
            ws = (w[:E, ...], w[E : 2 * E, ...], w[2 * E :, ...])
        else:
            ws = tuple(self.param(n, like) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        if self.bias:
            b = self.param("in_proj_bias", like)
            return ws + (b[:E], b[E : 2 * E], b[2 * E :])
        return ws + (None, None, None)

    def _linear(self, x, w, b, place):
        """``x @ w.T + b`` as torch's ``F.linear``: a float16/bfloat16 layer on the host accumulates
        in float32 and rounds once to its dtype (torch's CPU GEMMs do the same; NumPy's float16
        product would round at every step); otherwise in the arrays' own dtype."""
        if place.is_numpy and self.compute_dtype != self.dtype:
            f32 = self.compute_dtype
            y = x.astype(f32) @ w.astype(f32).T
            if b is not None:
                y += b.astype(f32)
            return y.astype(self.dtype)
        y = x @ w.T
        if b is not None:
            y += b
        return y

    def _heads(self, x, w, b, name, place):
        """(N, T, d_in) @ W.T + b -> (N, W.shape[0] // head_dim, T, head_dim)."""
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"{name} has {x.shape[-1]} features, expected {w.shape[1]} (shape {tuple(x.shape)})")
        y = self._linear(x, w, b, place)
        N, T, width = y.shape
        # explicit head count: reshape cannot infer -1 from an empty array (N, L or S = 0)
        return place.xp.permute_dims(place.xp.reshape(y, (N, T, width // self.head_dim, self.head_dim)), (0, 2, 1, 3))

    def _static(self, x, name: str, N: int, place):
        """``static_k``/``static_v`` of ``F.multi_head_attention_forward``: precomputed keys or
        values ``(N * kv_heads, S, head_dim)`` used instead of projecting ``key``/``value``, as
        ``(N, kv_heads, S, head_dim)`` in this layer's dtype and ``place``."""
        heads = self.kv_width // self.head_dim
        if self.add_bias_kv:
            raise ValueError(f"{name} cannot be combined with add_bias_kv (as torch: no bias is added to a static key)")
        if place.is_numpy:
            x = self._input_array(x, name)
        elif not place.holds(x):
            x = place.put(x, what=name)
        want = (N * heads, "S", self.head_dim)
        if x.ndim != 3 or x.shape[0] != N * heads or x.shape[2] != self.head_dim:
            raise ValueError(f"{name} must have shape (N * num_heads, S, head_dim) = {want}, got {tuple(x.shape)}")
        if not place.is_numpy:
            x = place.put(x, self.dtype, name)
        return place.xp.reshape(x, (N, heads, x.shape[1], self.head_dim))

    def _input_array(self, x, name: str) -> np.ndarray:
        arr = self.to_host(x)
        arr = np.asarray(arr)
        if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
            raise TypeError(f"{name} must be floating, got dtype {arr.dtype} with shape {arr.shape}")
        return arr.astype(self.dtype, copy=False)

    def _numpy_weights(self) -> bool:
        """True when the parameters are this class's NumPy arrays (not rebound, e.g. to torch
        tensors by ``engine.torch.as_module``) and laid out as this class lays them out."""
        return type(self).projection_weights is MultiHeadAttention.projection_weights and isinstance(
            self.param(
                "out_proj.weight"
                if self.out_projection
                else "in_proj_weight"
                if self.same_embed_dim
                else "q_proj_weight"
            ),
            np.ndarray,
        )

    def _transposed(self, key: str) -> np.ndarray:
        """``param(key).T`` as a C-contiguous copy, made once and kept until the parameters change
        (NumPy's matmul with a contiguous right operand took half the time of the transposed view:
        21 against 40 us for (16, 256) @ (256, 256) on one thread)."""
        params = self._params
        cache = self.__dict__.get("_transposed_cache")
        if cache is None or cache[0] is not params:
            cache = self.__dict__["_transposed_cache"] = (params, {})
        arr = cache[1].get(key)
        if arr is None:
            arr = cache[1][key] = np.ascontiguousarray(params[key].T)
        return arr

    def _self_projections(self, x):
        """Self-attention on NumPy weights: the three projections as one GEMM with the transposed
        ``in_proj_weight`` (E, 3E), as torch's ``in_projection_packed``; q, k, v are views."""
        wt = self._transposed("in_proj_weight")
        if x.shape[-1] != wt.shape[0]:
            raise ValueError(f"query has {x.shape[-1]} features, expected {wt.shape[0]} (shape {tuple(x.shape)})")
        y = x @ wt
        if self.bias:
            y += self._params["in_proj_bias"]
        N, T, _ = y.shape
        # one copy into head-major order: q, k and v reach the kernel C-contiguous, as they are
        y = np.ascontiguousarray(y.reshape(N, T, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4))
        return y[0], y[1], y[2]

    def attention_mods(self, N: int, L: int, S: int, **call_kwargs) -> dict:
        """Extra ``scaled_dot_product_attention`` arguments (``score_mod``, ``mask_mod``,
        ``mod_args``, ``block_mask``, ``enable_gqa``) for this variant; none for plain multi-head.
        Subclasses built on mods override this; ``call_kwargs`` are the variant's own call keywords."""
        if call_kwargs:
            raise TypeError(f"{self.name!r} got unexpected keyword arguments {sorted(call_kwargs)}")
        return {}

    def forward(
        self,
        query,
        key,
        value,
        *,
        attn_mask,
        key_padding_mask,
        need_weights,
        average_attn_weights,
        is_causal,
        backend,
        static_k=None,
        static_v=None,
        **call_kwargs,
    ):
        place = self.placement_of(query)  # NumPy, or the caller's GPU library: everything stays there
        xp = place.xp
        # NumPy weights in the compute dtype: kept transposed copies, one GEMM for self-attention
        numpy_weights = place.is_numpy and self.compute_dtype == self.dtype and self._numpy_weights()
        packed_self = self.same_embed_dim and query is key and key is value and static_k is None and static_v is None
        if numpy_weights and packed_self:
            q, k, v = self._self_projections(query)
        else:
            wq, wk, wv, bq, bk, bv = self.projection_weights(like=query)
            q = self._heads(query, wq, bq, "query", place)
            N = q.shape[0]
            k = (
                self._heads(key, wk, bk, "key", place)
                if static_k is None
                else self._static(static_k, "static_k", N, place)
            )
            v = (
                self._heads(value, wv, bv, "value", place)
                if static_v is None
                else self._static(static_v, "static_v", N, place)
            )
            if k.shape[2] != v.shape[2]:
                raise ValueError(
                    f"keys and values must have one length S, got {k.shape[2]} keys "
                    f"({'static_k' if static_k is not None else 'key'}) and {v.shape[2]} values "
                    f"({'static_v' if static_v is not None else 'value'})"
                )
        N, H, L, _ = q.shape
        S = k.shape[2]
        mask, causal = mha_masks_to_sdpa(attn_mask, key_padding_mask, is_causal, N, H, L, S, self.compute_dtype, place)
        if mask is not None and place.is_numpy and self.compute_dtype != self.dtype and mask.dtype.kind == "f":
            mask = mask.astype(self.dtype).astype(self.compute_dtype)  # as torch: a float mask in the layer dtype
        extra = self.attention_mods(N, L, S, **call_kwargs)
        if place.is_numpy and "mod_args" in extra:  # the cpu kernels take host arrays only
            extra["mod_args"] = tuple(self.to_host(a) for a in extra["mod_args"])
        appended = self._appended_keys(N, k.shape[1], query, place)
        # a 16-bit layer on the host: what follows the projections runs in float32 on their
        # (exactly widened) values and is rounded once per torch op (attention, weights, output)
        widen = place.is_numpy and self.compute_dtype != self.dtype
        if widen and (appended is not None or need_weights):
            q, k, v = (a.astype(self.compute_dtype) for a in (q, k, v))
            appended = None if appended is None else tuple(a.astype(self.compute_dtype) for a in appended)
        weights = None
        if need_weights:  # materialises (N, H, L, S): checked before anything is allocated
            self.check_fits_in_memory(N * H * L * S * 8 * 3, f"need_weights=True for (N, heads, L, S) = {(N, H, L, S)}")
            weights = self._weights(q, k, v, mask, causal, extra, place)
        if appended is None:
            out = self.attention(q, k, v, attn_mask=mask, is_causal=causal, backend=backend, **extra)
            if not (place.is_numpy and isinstance(out, np.ndarray)):
                out = place.put(out)
        else:
            out, lse = self.attention(
                q, k, v, attn_mask=mask, is_causal=causal, backend=backend, return_lse=True, **extra
            )
            out, weights = _merge_appended(q, place.put(out), place.put(lse), *appended, weights, xp)
        if weights is not None and average_attn_weights:
            weights = xp.mean(weights, axis=1)
        if widen:
            out = out.astype(self.dtype)
            weights = None if weights is None else weights.astype(self.dtype)
        if isinstance(out, np.ndarray):  # (NumPy's own methods: the array-API wrappers cost microseconds)
            out = out.transpose(0, 2, 1, 3).reshape(N, L, self.embed_dim)
        else:
            out = xp.reshape(xp.permute_dims(out, (0, 2, 1, 3)), (N, L, self.embed_dim))
        if self.out_projection:
            if numpy_weights:  # the transposed weight, contiguous (kept): NumPy's GEMM takes it faster
                out = out @ self._transposed("out_proj.weight")
                if self.bias:
                    out += self._params["out_proj.bias"]
            else:
                out = self._linear(
                    out,
                    self.param("out_proj.weight", like=query),
                    self.param("out_proj.bias", like=query) if self.bias else None,
                    place,
                )
        return out, weights

    def _appended_keys(self, N: int, kv_heads: int, like, place):
        """``(keys, values)`` appended to every sequence by ``add_bias_kv``/``add_zero_attn``, each
        ``(N, kv_heads, X, head_dim)`` with X = 1 or 2, in ``place``; None when there are none."""
        if not (self.add_bias_kv or self.add_zero_attn):
            return None
        xp, d = place.xp, self.head_dim
        parts_k, parts_v = [], []
        if self.add_bias_kv:
            for key, parts in (("bias_k", parts_k), ("bias_v", parts_v)):
                b = xp.reshape(self.param(key, like=like), (1, kv_heads, 1, d))
                parts.append(xp.broadcast_to(b, (N, kv_heads, 1, d)))
        if self.add_zero_attn:
            zeros = place.put(np.zeros((N, kv_heads, 1, d), self.dtype))
            parts_k.append(zeros)
            parts_v.append(zeros)
        return xp.concat(parts_k, axis=2), xp.concat(parts_v, axis=2)

    def _weights(self, q, k, v, mask, causal, extra, place):
        """The (N, H, L, S) probabilities (``engine.attention_weights``, the NumPy oracle) on host
        copies of the projected inputs: a mod is Numba code, so only the host can evaluate it here."""
        host_extra = dict(extra)
        if "mod_args" in extra:
            host_extra["mod_args"] = tuple(self.to_host(a) for a in extra["mod_args"])
        mask = None if mask is None else self.to_host(mask)
        return place.put(attention_weights(self.to_host(q), self.to_host(k), mask, causal, **host_extra))


def _merge_appended(q, out, lse, keys, values, weights, xp):
    """Attention over the sequence's keys (``out``, ``lse``; ``weights`` (N, H, L, S) or None)
    merged with attention over the appended ``keys``/``values`` (N, Hkv, X, d), which every query
    sees with plain scaled scores. The exact log-sum-exp merge of two disjoint key sets; returns
    ``(out, weights)`` with weights (N, H, L, S + X)."""
    N, H, L, d = q.shape
    Hkv, X = keys.shape[1], keys.shape[2]
    g = H // Hkv  # GQA: query heads per key/value head
    qg = xp.reshape(q, (N, Hkv, g * L, d))
    s = xp.reshape(qg @ xp.permute_dims(keys, (0, 1, 3, 2)), (N, H, L, X)) * (1.0 / math.sqrt(d))
    top = xp.maximum(lse, xp.max(s, axis=-1))  # finite: the appended keys are visible
    w_seq = xp.exp(lse - top)  # 0 for rows that saw no key of the sequence
    w_app = xp.exp(s - top[..., None])
    total = w_seq + xp.sum(w_app, axis=-1)
    app_out = xp.reshape(xp.reshape(w_app, (N, Hkv, g * L, X)) @ values, (N, H, L, d))
    out = (w_seq[..., None] * out + app_out) / total[..., None]
    if weights is not None:
        weights = xp.concat([weights * (w_seq / total)[..., None], w_app / total[..., None]], axis=-1)
    return out, weights


@hookimpl
def attention_variants():
    return [MultiHeadAttention]
