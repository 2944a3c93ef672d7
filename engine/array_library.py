"""Which array library a variant computes in: NumPy on the host, the caller's own on a GPU.

Variants compute their projections with array-API calls (``array_api_compat`` gives torch, CuPy
and NumPy one namespace), so a torch CUDA tensor or a CuPy array is projected on its GPU with the
weights copied there once, and the attention between the projections runs on the ``cuda``
backend in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from .validation import is_device_array, is_torch_bfloat16

__all__ = ["Placement", "HOST", "placement_of", "input_placement", "to_numpy", "to_host"]


class Placement(NamedTuple):
    """An array namespace and a device in it: ``xp.asarray(a, device=device)`` puts ``a`` there."""

    xp: Any
    device: Any

    @property
    def is_numpy(self) -> bool:
        return self.xp is HOST.xp

    def key(self) -> tuple:
        """A hashable name for caching arrays placed here."""
        return (self.xp.__name__, str(self.device))

    def put(self, value: Any, dtype=None, what: str = "value"):
        """``value`` as an array of this namespace on this device (no copy when it is one already,
        and then the very object: a torch tensor keeps its autograd history), optionally cast to
        the NumPy ``dtype``. Host values go through NumPy on the way."""
        if not self.is_numpy and self.holds(value):
            arr = value
        else:
            if self.is_numpy or not is_device_array(value):
                value = to_numpy(value, what)
            arr = self.xp.asarray(value, device=self.device)
        if dtype is not None:
            arr = self.xp.astype(arr, getattr(self.xp, np.dtype(dtype).name), copy=False)
        return arr

    def holds(self, value: Any) -> bool:
        """True when ``value`` is already an array of this namespace on this device."""
        if isinstance(value, np.ndarray) or not array_api_compat.is_array_api_obj(value):
            return self.is_numpy and isinstance(value, np.ndarray)
        return array_api_compat.array_namespace(value) is self.xp and str(array_api_compat.device(value)) == str(
            self.device
        )


#: NumPy on the host: where every non-device input is computed
HOST = Placement(array_api_compat.array_namespace(np.empty(0)), "cpu")


def placement_of(x: Any) -> Placement:
    """The namespace and device of an array-API array (NumPy, torch, CuPy, ...)."""
    if isinstance(x, np.ndarray):
        return HOST
    return Placement(array_api_compat.array_namespace(x), array_api_compat.device(x))


def input_placement(x: Any, name: str) -> Placement:
    """Where a variant computes on input ``x``: :data:`HOST` for host inputs (NumPy, torch CPU
    tensors, lists), the library and device of a torch CUDA tensor or a CuPy array. ``TypeError``
    naming ``name`` for other device arrays (Numba device arrays have no matrix product; the
    functional API takes them)."""
    if not is_device_array(x):
        return HOST
    if not (array_api_compat.is_torch_array(x) or array_api_compat.is_cupy_array(x)):
        raise TypeError(
            f"{name} is a device array of type {type(x).__module__}.{type(x).__name__}; "
            f"variants compute on torch CUDA tensors or CuPy arrays (or host arrays). "
            f"engine.scaled_dot_product_attention takes any __cuda_array_interface__ array"
        )
    return placement_of(x)


def to_numpy(value: Any, what: str) -> np.ndarray:
    """A NumPy array holding ``value``: torch tensors (CPU or CUDA; bfloat16 ones as float32), CuPy
    and Numba device arrays are copied to the host; anything else goes through ``np.asarray``.
    ``TypeError`` naming ``what`` when it cannot be converted."""
    if array_api_compat.is_torch_array(value):
        value = value.detach().cpu()
        # NumPy has no bfloat16: widen it (exact) rather than fail; callers cast to their dtype
        return (value.float() if is_torch_bfloat16(value) else value).numpy()
    if array_api_compat.is_cupy_array(value):
        return value.get()
    if is_device_array(value) and hasattr(value, "copy_to_host"):  # Numba device array
        return value.copy_to_host()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{what} could not be converted to an array: {exc}") from None


def to_host(value: Any) -> Any:
    """NumPy copies of arrays of other libraries or devices; NumPy arrays, scalars and anything
    that is not an array are returned as they are."""
    if isinstance(value, (np.ndarray, np.generic)) or not (
        array_api_compat.is_array_api_obj(value) or is_device_array(value)
    ):
        return value
    return to_numpy(value, "argument")
