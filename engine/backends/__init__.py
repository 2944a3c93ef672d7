"""Compute backends: ``base`` (``Backend`` and ``Op``), ``registry``, and one package per backend
with one module per capability. This module is also the plugin that contributes the built-in
ones."""

from ..plugins.hookspecs import hookimpl
from .base import Backend, Op
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend

__all__ = ["Backend", "Op", "CpuBackend", "CudaBackend", "ReferenceBackend"]


@hookimpl
def attention_backends():
    return [ReferenceBackend, CpuBackend, CudaBackend]
