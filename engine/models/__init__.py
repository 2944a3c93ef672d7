"""Models built on the engine, kept out of the core: each module imports its heavy dependencies
(torch, transformers, safetensors, matplotlib) itself, and ``import engine`` imports none of them.

- :mod:`engine.models.minilm`: all-MiniLM-L6-v2 with every attention layer on the ``multi-head``
  variant; :mod:`engine.models.demo` is ``attention-engine demo``.
"""
