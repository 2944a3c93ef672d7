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

import numpy as np
import torch

from .convert import from_numpy

__all__ = ["CallConfig", "config_key", "call_config", "split_mod_args", "TENSOR"]

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


def _static_ident(a):
    """What tells two ``mod_args`` entries apart: their type and value, floating-point numbers by
    their bits (``0.0 == -0.0``, but a mod may tell them apart, as ``copysign`` does; a NaN equals
    no NaN, which gave every call a new config), tuples entry by entry."""
    if isinstance(a, tuple):
        return ("tuple",) + tuple(_static_ident(x) for x in a)
    if isinstance(a, (float, complex, np.floating, np.complexfloating)):
        return (type(a).__name__, np.asarray(a).tobytes())
    return (type(a).__name__, _hashable(a))


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
        + tuple(_static_ident(a) for a in statics)
    )
    key = _keys.get(ident)
    if key is None:
        key = _keys[ident] = len(_configs)
        _configs.append(config)
    return key


def call_config(key: int) -> CallConfig:
    """The configuration registered under ``key``."""
    return _configs[key]


def split_mod_args(mod_args) -> tuple[list, tuple, tuple]:
    """``(tensors, positions, statics)`` of a call's ``mod_args``: the tensor entries (NumPy arrays
    become tensors: operator inputs like any other), their positions, and every other entry in
    order (what :func:`config_key` takes).

    :raises TypeError: ``mod_args`` is not a tuple.
    :raises ValueError: a 0-d tensor that requires grad (a learnable scalar is a 1-element tensor
        the score_mod reads as ``t[0]``).
    """
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    tensors, positions, statics = [], [], []
    for i, a in enumerate(mod_args):
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(a) if torch.compiler.is_compiling() else from_numpy(a)
        if isinstance(a, torch.Tensor):
            if a.requires_grad and a.ndim == 0:
                raise ValueError(
                    f"mod_args[{i}] requires grad but is 0-d: a learnable scalar is a 1-element "
                    "tensor the score_mod reads as t[0]"
                )
            tensors.append(a)
            positions.append(i)
        else:
            statics.append(a)
    return tensors, tuple(positions), tuple(statics)
