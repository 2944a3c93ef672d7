"""The ``reference`` backend: plain NumPy, materialises the score matrix in float64. The test oracle.
One op per capability: ``forward``, ``backward``, ``decode``, ``varlen``; ``dense`` holds the arithmetic,
``sequences`` the dense view of one sequence of a ragged batch."""

from __future__ import annotations

from ..base import Backend
from .backward import ReferenceBackward
from .decode import ReferenceDecode
from .forward import ReferenceForward
from .varlen import ReferenceVarlen, ReferenceVarlenBackward

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy, materialised float64 scores; the oracle the other backends are tested against"
    priority = 0
    ops = (ReferenceForward, ReferenceBackward, ReferenceDecode, ReferenceVarlen, ReferenceVarlenBackward)
