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

from ..problems.arrays import refuse_masked_array
from .convert import from_numpy

__all__ = ["CallConfig", "Number", "config_key", "call_config", "split_mod_args", "tensor_slot", "TENSOR"]

#: the placeholder of a tensor entry of ``mod_args`` in ``CallConfig.mod_args``
TENSOR = object()

#: Python number types that travel as 0-d tensors under ``torch.compile`` (see :class:`Number`)
_NUMBER_KINDS = {"bool": (bool, torch.bool), "int": (int, torch.int64), "float": (float, torch.float64)}
#: the symbolic numbers non-strict ``torch.export`` passes in their place
_SYMBOLIC = {"SymBool": "bool", "SymInt": "int", "SymFloat": "float"}


@dataclass(frozen=True)
class Number:
    """The placeholder of a Python number of ``mod_args`` that a traced call passes to the
    operators as a 0-d tensor (float64, int64 or bool: its exact value), handed back to the mods
    as a number of its own type. Under ``torch.compile`` a number whose value changes between
    calls becomes a symbolic graph input: as a constant of the configuration it failed
    (``assume_constant_result`` takes no symbolic value) and recompiled per value."""

    kind: str

    def value(self, array):
        return _NUMBER_KINDS[self.kind][0](array)


def tensor_slot(a) -> bool:
    """Whether a ``CallConfig.mod_args`` entry is filled from the operators' ``mod_tensors``."""
    return a is TENSOR or type(a) is Number


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
        """``mod_args`` with the tensors (as the engine's arrays) back in their places, and the
        numbers that travelled as tensors back as numbers."""
        it = iter(tensors)
        return tuple(next(it) if a is TENSOR else a.value(next(it)) if type(a) is Number else a for a in self.mod_args)


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
    ``torch.compile`` can hand them to this function as constants). A position given as
    ``(i, kind)`` is a number that travels as a tensor (:class:`Number`)."""
    n = len(tensor_positions) + len(statics)
    it = iter(statics)
    slots = {p if type(p) is int else p[0]: TENSOR if type(p) is int else Number(p[1]) for p in tensor_positions}
    mod_args = tuple(slots[i] if i in slots else next(it) for i in range(n))
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

    Under ``torch.compile`` the Python numbers (bool, int, float) are tensors too, at positions
    ``(i, kind)`` (:class:`Number`): their values are then graph inputs, not constants.

    :raises TypeError: ``mod_args`` is not a tuple.
    :raises ValueError: a 0-d tensor that requires grad (a learnable scalar is a 1-element tensor
        the score_mod reads as ``t[0]``).
    """
    if not isinstance(mod_args, tuple):
        raise TypeError(f"mod_args must be a tuple, got {type(mod_args).__name__}")
    tensors, positions, statics = [], [], []
    compiling = torch.compiler.is_compiling()
    for i, a in enumerate(mod_args):
        kind = _SYMBOLIC.get(type(a).__name__, type(a).__name__)
        if compiling and kind in _NUMBER_KINDS and not (kind == "int" and _past_int64(a)):
            tensors.append(_number_tensor(a, kind))
            positions.append((i, kind))
            continue
        if isinstance(a, np.ndarray):
            refuse_masked_array(a, f"mod_args[{i}]")
            a = torch.from_numpy(a) if compiling else from_numpy(a)
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


def _past_int64(a) -> bool:
    """An int outside int64 (kept a constant: no tensor holds it). A symbolic int is within."""
    return type(a) is int and not -(2**63) <= a < 2**63


def _number_tensor(a, kind: str) -> torch.Tensor:
    """A 0-d tensor holding the number ``a`` exactly. A float as ``ones * a`` (exact, -0.0 and NaN
    included): ``torch.scalar_tensor``/``torch.tensor`` of a symbolic float make Dynamo specialise
    on its value, a graph per value until the recompile limit failed the call under
    ``fullgraph=True``; an int or bool through ``scalar_tensor`` stays symbolic."""
    if kind == "float":
        return torch.ones((), dtype=torch.float64) * a
    return torch.scalar_tensor(a, dtype=_NUMBER_KINDS[kind][1])
