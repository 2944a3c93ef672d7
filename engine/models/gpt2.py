"""GPT-2 in NumPy, every attention through ``engine.attention_with_kvcache``: greedy generation
that reproduces ``transformers``' ``GPT2LMHeadModel.generate(do_sample=False)`` token for token.

The weights come from a ``transformers`` model (:meth:`GPT2.from_transformers`); nothing is
downloaded: :func:`random_gpt2` builds one from a ``GPT2Config`` with a fixed seed. Everything but
attention is plain float32 NumPy (layer norm, ``gelu_new``, the ``Conv1D`` projections
``y = x @ W + b``, the tied output embedding), in the order transformers computes it.

Ragged batches need no padding in the cache: each sequence has its own length in
``cache_seqlens``. The prompt of every sequence is prefilled in one call per layer, right-padded
to the longest prompt (causal attention keeps real tokens from seeing the padding after them, and
a sequence's next token overwrites its padding in the cache); each decode step then writes one
token per sequence at its own length. transformers instead needs the batch **left**-padded with an
attention mask (decoder-only models predict from the last position), and derives each token's
position from that mask, so both compute the same positions and logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GPT2", "Generation", "random_gpt2", "tiny_config"]


@dataclass
class Generation:
    """What :meth:`GPT2.generate` returns for B prompts and N new tokens.

    ``tokens`` (B, N) int64: the greedy choices. ``logits`` (N, B, vocab) float32: the scores each
    choice was made from (step t's are computed after the prompt and t - 1 new tokens).
    """

    tokens: np.ndarray
    logits: np.ndarray


def _layer_norm(x, weight, bias, eps):
    """The mean and variance as ``ndarray.mean`` computes them (the same sums and division, bit for
    bit), without its Python wrapper: 9.5 against 13.3 us per (1, 1, 768) row, 25 per step."""
    n = np.float32(x.shape[-1])
    centred = x - np.add.reduce(x, axis=-1, keepdims=True) / n
    var = np.add.reduce(centred * centred, axis=-1, keepdims=True) / n
    return centred / np.sqrt(var + eps) * weight + bias


def _held_for_one_row(name: str, w) -> np.ndarray:
    """A float32 copy of ``w``, a block's ``Conv1D`` weight (in, out) in the memory order that
    reads fastest in a decode step (one row per sequence): column-major where the output is no
    wider than the input (``attn.c_proj`` 768 x 768, ``mlp.c_proj`` 3072 x 768), row-major where
    it is wider (``c_attn``, ``c_fc``) and for every other parameter. :func:`_linear` multiplies by
    either. Measured on AMD Zen 4, 2 threads, NumPy's OpenBLAS (``python
    bench/gpt2_weight_layout.py``): GPT-2 small's batch-1 generation 60.1 against 48.7 tokens/s all
    row-major with its SkylakeX kernels, 54.2 against 48.5 with its Haswell (AVX2) kernels; the
    output projection ``wte.T`` (768 x 50257) stays row-major, where its product is faster
    (``bench/gpt2_weight_products.py``)."""
    w = np.asarray(w)
    column_major = name.startswith("transformer.h.") and name.endswith(".weight") and w.ndim == 2
    column_major = column_major and w.shape[1] <= w.shape[0]
    return np.array(w, dtype=np.float32, order="F" if column_major else "C")


#: below this many sequences of one token each (a decode step of a small batch) a product runs as
#: one matrix-vector product per sequence (NumPy's stacked ``matmul``), from it on as one 2-D
#: product. Measured on AMD Zen 4, 2 threads, NumPy's OpenBLAS, ``mlp.c_proj`` (3072 x 768,
#: column-major): 4 rows 0.28 ms stacked against 0.32 ms as one product, 16 rows 1.04 against 0.55.
STACKED_ROWS = 16


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``x @ w + b`` for x (B, L, in) and w (in, out) held as :func:`_held_for_one_row` holds it:
    a decode step of fewer than :data:`STACKED_ROWS` sequences as ``x @ w`` (one matrix-vector
    product per sequence, in w's order), anything else as one 2-D product over every row, a
    column-major w multiplied as ``(w.T @ x.T).T`` (row-major w.T: ``x @ w`` on a column-major w
    took 1.7x as long at 16 rows of 3072 here). Only the order of each output's sum differs."""
    B, L, n_in = x.shape
    if L == 1 and B < STACKED_ROWS:
        y = x @ w
    else:
        rows = x.reshape(B * L, n_in)
        y = (w.T @ rows.T).T if w.flags.f_contiguous and not w.flags.c_contiguous else rows @ w
        y = y.reshape(B, L, w.shape[1])
    return y if b is None else y + b


def _gelu_new(x):
    """GPT-2's tanh approximation of GELU (transformers' ``gelu_new``). The cube is ``x * x * x``:
    what torch's ``pow(x, 3.0)`` computes (bit for bit), where NumPy's ``x**3`` calls ``powf`` per
    element (another rounding, and 170 us for a decode step's 3072 values: 8% of a step)."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * (x * x * x))))


class GPT2:
    """A GPT-2 language model held as NumPy arrays (float32), for greedy generation.

    ``params`` uses transformers' state-dict names (``transformer.h.0.attn.c_attn.weight`` ...):
    NumPy arrays or anything ``np.asarray`` reads (CPU tensors without gradients, of a NumPy
    dtype); they are copied to float32 (:func:`_held_for_one_row`), so changing the source
    afterwards leaves the model as it was. ``lm_head.weight``, where given, is the output
    projection (an untied head); else ``transformer.wte.weight`` is. ``config`` needs ``n_layer``,
    ``n_head``, ``n_embd``, ``n_positions``, ``layer_norm_epsilon``.
    """

    def __init__(self, params: dict, config):
        self.config = config
        self.n_layer, self.n_head, self.n_embd = config.n_layer, config.n_head, config.n_embd
        self.head_dim = self.n_embd // self.n_head
        self.eps = float(config.layer_norm_epsilon)
        self.p = {k: _held_for_one_row(k, v) for k, v in params.items()}
        self.wte = self.p["transformer.wte.weight"]
        # the output projection (n_embd, vocab): lm_head.weight where given (transformers' state dict
        # holds it even when tied to wte), not kept twice
        head = self.p.pop("lm_head.weight", self.wte)
        self.wte_t = np.ascontiguousarray(head.T)
        self.wpe = self.p["transformer.wpe.weight"]

    @classmethod
    def from_transformers(cls, model) -> "GPT2":
        """The weights of a ``transformers`` ``GPT2LMHeadModel`` (copied to NumPy)."""
        params = {
            k: v.detach().cpu().float().numpy()
            for k, v in model.state_dict().items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        return cls(params, model.config)

    def _block(self, i, x, k_cache, v_cache, seqlens, backend):
        """One transformer block on x (B, L, n_embd): the new tokens' keys and values are written
        into this layer's caches at ``seqlens``, and attention reads each sequence's cache."""
        p, pre = self.p, f"transformer.h.{i}."
        B, L, _ = x.shape
        h = _layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], self.eps)
        qkv = _linear(h, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])
        # (B, L, 3, H, hd) -> three (B, H, L, hd): the engine's head-major layout
        qkv = qkv.reshape(B, L, 3, self.n_head, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = (np.ascontiguousarray(a) for a in qkv)
        from ..decoding import attention_with_kvcache

        a = attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, is_causal=True, backend=backend)
        a = a.transpose(0, 2, 1, 3).reshape(B, L, self.n_embd)
        x = x + _linear(a, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])
        h = _layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], self.eps)
        h = _gelu_new(_linear(h, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"]))
        return x + _linear(h, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])

    def _forward(self, tokens, positions, caches, seqlens, backend):
        """Logits (B, L, vocab) of ``tokens`` (B, L) at ``positions`` (B, L), after the caches."""
        x = self.wte[tokens] + self.wpe[positions]
        for i, (kc, vc) in enumerate(caches):
            x = self._block(i, x, kc, vc, seqlens, backend)
        x = _layer_norm(x, self.p["transformer.ln_f.weight"], self.p["transformer.ln_f.bias"], self.eps)
        return _linear(x, self.wte_t)

    def generate(self, prompts, max_new_tokens: int, *, backend: str = "auto", cache_dtype=np.float32) -> Generation:
        """Greedy decoding of ``max_new_tokens`` tokens after each prompt.

        :param prompts: a list of B token-id sequences, of any lengths >= 1 (a ragged batch).
        :param cache_dtype: the KV cache's dtype: float32 (the same numbers as transformers), or
            float16/bfloat16 (half the cache's bytes; the logits then differ by the rounding).
        :return: a :class:`Generation`.
        :raises ValueError: an empty prompt, or prompt + new tokens longer than ``n_positions``.
        """
        prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        lengths = np.array([len(p) for p in prompts], dtype=np.int32)
        if not len(prompts) or lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = int(lengths.max()) + max_new_tokens
        if total > self.config.n_positions:
            raise ValueError(
                f"the longest prompt ({lengths.max()}) plus {max_new_tokens} new tokens exceeds the "
                f"model's {self.config.n_positions} positions"
            )
        B = len(prompts)
        # one cache pair per layer, every sequence its own row: (B, heads, total, head_dim)
        shape = (B, self.n_head, total, self.head_dim)
        caches = [(np.zeros(shape, cache_dtype), np.zeros(shape, cache_dtype)) for _ in range(self.n_layer)]
        width = int(lengths.max())
        padded = np.zeros((B, width), dtype=np.int64)  # right padding: causal keeps it unseen
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = p
        positions = np.broadcast_to(np.arange(width), (B, width))
        seqlens = np.zeros(B, dtype=np.int32)
        logits = self._forward(padded, positions, caches, seqlens, backend)
        step = logits[np.arange(B), lengths - 1]
        seqlens = lengths.copy()
        tokens = np.empty((B, max_new_tokens), dtype=np.int64)
        all_logits = np.empty((max_new_tokens, B, step.shape[-1]), dtype=np.float32)
        for t in range(max_new_tokens):
            all_logits[t] = step
            tokens[:, t] = nxt = step.argmax(-1)
            if t + 1 == max_new_tokens:
                break
            step = self._forward(nxt[:, None], seqlens[:, None].astype(np.int64), caches, seqlens, backend)[:, 0]
            seqlens = seqlens + 1
        return Generation(tokens, all_logits)


def tiny_config(**overrides):
    """A small ``GPT2Config`` for tests and quick checks (2 layers, 4 heads, width 64, 256 tokens),
    initialised wider than GPT-2's default so that greedy choices vary from step to step."""
    from transformers import GPT2Config

    kw = dict(
        vocab_size=256,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def random_gpt2(config=None, seed: int = 0):
    """``(transformers model, GPT2)``: a ``GPT2LMHeadModel`` built from ``config`` (default: GPT-2
    small's configuration) with weights drawn with ``torch.manual_seed(seed)``, in eval mode, and its
    NumPy copy. No download: the weights are random, the architecture GPT-2's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if config is None:
        config = GPT2Config(eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    return model, GPT2.from_transformers(model)


def transformers_generate(model, prompts, max_new_tokens: int) -> Generation:
    """The same greedy generation with ``model.generate(do_sample=False)``: the prompts
    left-padded (pad id 0) with an attention mask, as transformers needs for a decoder-only batch."""
    import torch

    B, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.as_tensor(np.asarray(p, dtype=np.int64))
        mask[b, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    tokens = out.sequences[:, width:].numpy()
    logits = torch.stack(out.logits).float().numpy()
    return Generation(tokens, logits)
