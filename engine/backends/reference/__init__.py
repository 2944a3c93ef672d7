"""The ``reference`` backend: plain NumPy, materialises the score matrix in float64. The test oracle.
One op per capability: ``forward``, ``backward``, ``decode``; ``dense`` holds the arithmetic."""

from __future__ import annotations

from ..base import Backend
from .backward import ReferenceBackward
from .decode import ReferenceDecode
from .forward import ReferenceForward

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"
    description = "NumPy, materialised float64 scores; the oracle the other backends are tested against"
    priority = 0
    ops = (ReferenceForward, ReferenceBackward, ReferenceDecode)
