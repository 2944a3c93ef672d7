"""``engine.torch``: the engine's attention inside torch autograd (an optional extra: torch).

``import engine`` never imports torch; this package does.

- :func:`scaled_dot_product_attention` has the signature of
  ``torch.nn.functional.scaled_dot_product_attention`` plus the engine's keywords. Its forward is
  the engine's forward and its backward the engine's backward, registered as torch custom
  operators (``engine.torch.ops``), so ``torch.compile(fullgraph=True)`` and ``torch.export`` see
  one opaque op per direction. CPU tensors are read and results returned without copies (NumPy
  views of the same memory). CUDA tensors are read in place by the ``cuda`` backend (forward and
  backward), on ``torch.cuda.current_stream()``, and the results and gradients are torch CUDA
  tensors on the inputs' device. Float tensors among ``mod_args`` that require grad get their
  gradient, and a loss may use the returned log-sum-exp (``return_lse=True``).
- :func:`varlen_attention` is ``engine.varlen_attention`` (packed sequences of different lengths,
  FlashAttention's ``flash_attn_varlen_func`` layout) with autograd through the engine's varlen
  backward, as a second pair of custom operators (``engine.torch.varlen``); CPU tensors only.
- ``sinks=`` on both (gpt-oss's attention sinks, ``(Hq,)``) gets its gradient when it requires one.
- :func:`as_module` turns a variant into a ``torch.nn.Module`` whose parameters are the variant's
  (torch's names, so ``state_dict()`` round-trips with ``nn.MultiheadAttention``), with the
  projections computed by torch and the attention by the engine, so gradients reach every
  parameter.
"""

from __future__ import annotations

from .functional import scaled_dot_product_attention
from .modules import VariantModule, as_module
from .varlen import varlen_attention

__all__ = ["scaled_dot_product_attention", "varlen_attention", "as_module", "VariantModule"]
