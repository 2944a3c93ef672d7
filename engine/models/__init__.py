"""Models built on the engine, kept out of the core: they need torch (and matplotlib for plots).

- :mod:`engine.models.char_lm`: a small decoder-only character-level transformer language model
  whose attention is torch's SDPA or the engine (``engine.torch``), with ALiBi as an option.
- :mod:`engine.models.train_demo`: trains it twice from the same initialisation and batches, once
  per attention, and compares the loss curves (``attention-engine train``).
"""
