"""Compute backends. This module is also the plugin that contributes the built-in ones."""

from ..hookspecs import hookimpl
from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend

__all__ = ["Backend", "CpuBackend", "CudaBackend", "ReferenceBackend"]


@hookimpl
def attention_backends():
    return [ReferenceBackend, CpuBackend, CudaBackend]
