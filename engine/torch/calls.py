"""What a custom operator cannot take as an argument, kept here under an int key.

A torch custom operator's arguments are tensors, numbers, strings and lists of them. A call's
``score_mod``/``mask_mod`` (Python functions), ``block_mask`` and the non-tensor entries of
``mod_args`` (numbers, tuples) are none of these: they are registered once as a
:class:`CallConfig` and the operators receive its key. :func:`config_key` is marked
``torch.compiler.assume_constant_result``, so under ``torch.compile`` or ``torch.export`` it runs
at trace time and the key is a constant of the graph (a graph specialises on its mods, as
FlexAttention's does; numbers among ``mod_args`` are constants too: changing one recompiles).
Configs live as long as the process (one per distinct combination: a new closure per call would
add one per call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CallConfig", "config_key", "call_config", "TENSOR"]

#: the placeholder of a tensor entry of ``mod_args`` in ``CallConfig.mod_args``
TENSOR = object()


@dataclass(frozen=True)
class CallConfig:
    """The non-tensor part of a call: the mods, the block mask, ``mod_args`` with ``TENSOR`` where
    a tensor goes (the operators' ``mod_tensors``, in order), and the backend's name."""

    score_mod: Any
    mask_mod: Any
    block_mask: Any
    mod_args: tuple
    backend: str

    def mod_args_with(self, tensors) -> tuple:
        """``mod_args`` with the tensors (as the engine's arrays) back in their places."""
        it = iter(tensors)
        return tuple(next(it) if a is TENSOR else a for a in self.mod_args)


_configs: list = []
_keys: dict = {}


def _hashable(x):
    try:
        hash(x)
        return x
    except TypeError:
        return ("id", id(x))


@torch.compiler.assume_constant_result
def config_key(score_mod, mask_mod, block_mask, tensor_positions: tuple, statics: tuple, backend: str) -> int:
    """The key of this configuration (registered on first use): ``mod_args`` has tensors at
    ``tensor_positions`` and the ``statics``, in order, everywhere else (plain values, so that
    ``torch.compile`` can hand them to this function as constants)."""
    n = len(tensor_positions) + len(statics)
    it = iter(statics)
    mod_args = tuple(TENSOR if i in tensor_positions else next(it) for i in range(n))
    config = CallConfig(score_mod, mask_mod, block_mask, mod_args, backend)
    ident = (
        tuple(_hashable(x) for x in (score_mod, mask_mod, block_mask, backend))
        + (tuple(tensor_positions),)
        + tuple((type(a).__name__, _hashable(a)) for a in statics)
    )
    key = _keys.get(ident)
    if key is None:
        key = _keys[ident] = len(_configs)
        _configs.append(config)
    return key


def call_config(key: int) -> CallConfig:
    """The configuration registered under ``key``."""
    return _configs[key]
