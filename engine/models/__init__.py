"""Models built on the engine, kept out of the core: each module imports its heavy dependencies
(torch, transformers, safetensors, matplotlib) itself, and ``import engine`` imports none of them.

- :mod:`engine.models.minilm`: all-MiniLM-L6-v2 with every attention layer on the ``multi-head``
  variant; :mod:`engine.models.demo` is ``attention-engine demo``.
- :mod:`engine.models.char_lm`: a small decoder-only character-level transformer language model
  whose attention is torch's SDPA or the engine (``engine.torch``), with ALiBi as an option.
- :mod:`engine.models.train_demo`: trains it twice from the same initialisation and batches, once
  per attention, and compares the loss curves (``attention-engine train``).
- :mod:`engine.models.gpt2`: GPT-2 in NumPy with every attention through
  ``engine.attention_with_kvcache``, generating greedily as transformers does;
  :mod:`engine.models.generate` is ``attention-engine generate``.
"""
