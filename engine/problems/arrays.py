"""The one notion of host and device arrays: what validation, the backends and the variants ask of an
array, without copying it.

* Host arrays are NumPy arrays (torch CPU tensors become NumPy views, bfloat16 as ml_dtypes'
  bfloat16); :func:`native` fixes byte order and alignment for Numba.
* Device arrays are anything with ``__cuda_array_interface__`` (torch CUDA, CuPy, Numba);
  :class:`DeviceArray` reads what validation needs (shape, strides, dtype, byte range) from the
  interface, with no copy and no synchronisation.
* A :class:`Placement` is an array namespace and a device (``array_api_compat``): where a variant
  computes its projections (NumPy on the host, torch or CuPy on a GPU).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

__all__ = [
    "is_device_array",
    "is_floating",
    "is_bfloat16",
    "is_torch_bfloat16",
    "bfloat16_dtype",
    "array_dtype",
    "as_array",
    "refuse_masked_array",
    "host_array",
    "any_array",
    "caller_array",
    "share_memory",
    "check_float",
    "native",
    "native_mod_args",
    "DeviceArray",
    "Placement",
    "HOST",
    "placement_of",
    "input_placement",
    "to_numpy",
    "to_host",
]


def is_device_array(x: Any) -> bool:
    """True for GPU arrays that expose ``__cuda_array_interface__`` (Numba, CuPy, torch CUDA)."""
    return hasattr(x, "__cuda_array_interface__")


def bfloat16_dtype() -> np.dtype:
    """NumPy's bfloat16 dtype, from ml_dtypes (NumPy has none of its own).

    ``TypeError`` when ml_dtypes is not installed (it comes with the ``cuda`` and ``test`` extras).
    """
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            "bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes, or the 'cuda' extra)"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: np.dtype) -> bool:
    """True for ml_dtypes' bfloat16 (a NumPy dtype of kind 'V' named 'bfloat16')."""
    return dtype.kind == "V" and dtype.name == "bfloat16"


def is_floating(dtype: np.dtype) -> bool:
    """True for the floating dtypes the engine accepts: NumPy's, and ml_dtypes' bfloat16."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def is_torch_bfloat16(x: Any) -> bool:
    """True for a torch tensor of dtype ``torch.bfloat16`` (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == "torch.bfloat16"


def array_dtype(x: Any) -> np.dtype:
    """The NumPy dtype of a host or device array, without copying it (ml_dtypes' bfloat16 for
    torch ``bfloat16`` CUDA tensors, whose interface type is an anonymous 2-byte ``<V2``)."""
    if is_device_array(x):
        typestr = x.__cuda_array_interface__["typestr"]
        if typestr == "<V2" and is_torch_bfloat16(x):
            return bfloat16_dtype()
        return np.dtype(typestr)
    return x.dtype


def refuse_masked_array(x: Any, name: str) -> None:
    """``TypeError`` for a NumPy masked array (``np.ma.MaskedArray`` or any subclass, such as
    astropy's masked columns): ``np.asarray`` would drop its mask without a word. Costs nothing
    where ``numpy.ma`` was never imported (then no masked array exists)."""
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(x, ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray (shape {x.shape}): its mask would be ignored; pass "
            "the values with masked entries filled (x.filled(value)) or the data (x.data)"
        )


def as_array(x: Any, name: str) -> Any:
    """Host inputs become ``np.ndarray`` (torch CPU tensors included, bfloat16 ones as ml_dtypes'
    bfloat16); device arrays stay as they are."""
    if type(x) is np.ndarray:  # the common case, first: no device or torch checks to pay for
        return native(x)
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if type(x).__name__ == "CausalBias":  # ours or torch's (whose storage is a placeholder)
        raise TypeError(
            f"{name} is a causal mask object ({type(x).__module__}.CausalBias), not an array of values: "
            "pass it as attn_mask"
        )
    if getattr(x, "requires_grad", False) and type(x).__module__.startswith("torch"):
        # np.asarray would fail with torch's "use tensor.detach().numpy()", and detaching would
        # silently drop the gradient the caller asked for
        raise TypeError(
            f"{name} is a torch tensor that requires grad (shape {tuple(x.shape)}); the NumPy API "
            "computes no gradients: use engine.torch.scaled_dot_product_attention for autograd, or "
            f"pass {name}.detach() if no gradient is wanted"
        )
    refuse_masked_array(x, name)
    if is_device_array(x):
        return x
    try:
        if is_torch_bfloat16(x):
            import torch

            # NumPy has no bfloat16; ml_dtypes' holds the same bits (a view, no copy)
            return x.view(torch.uint16).numpy().view(bfloat16_dtype())
        arr = np.asarray(x)
    except Exception as exc:  # e.g. ragged nested lists
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    return native(arr)


def native(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself when its layout suits a kernel; otherwise a copy in native byte order and
    aligned memory (the values are unchanged). Numba compiles no big-endian array, and compiles a
    new specialisation for an unaligned one."""
    if arr.dtype.isnative and arr.flags.aligned:
        return arr
    return np.require(arr, dtype=arr.dtype.newbyteorder("="), requirements="A")


def native_mod_args(mod_args: tuple) -> tuple:
    """``mod_args`` with its torch CPU tensors as NumPy arrays (:func:`as_array`) and its arrays
    made native and aligned (see :func:`native`; read-only ones are not copied: a new type of
    ``mod_args`` compiles only the mods' small loops, ``engine.kernels.mod_calls``), and a Python
    int past int64 as ``np.uint64`` (Numba types it so: its own type, not int64's kernels).
    ``TypeError`` for a float16/bfloat16 array or scalar: the kernels' mods compute in
    float32/float64, and Numba has no bfloat16 (nor float16 arithmetic on the CPU); for a tuple or
    list (a parallel kernel cannot take a tuple inside its ``mod_args``: every backend refuses it
    alike); ``ValueError`` for an int that does not fit in 64 bits."""
    out = []
    for i, a in enumerate(mod_args):
        if isinstance(a, (tuple, list)):
            raise TypeError(
                f"mod_args[{i}] is a {type(a).__name__} of {len(a)}; mods take scalars and arrays: "
                "pass it as an array (np.asarray(...)) or as separate mod_args"
            )
        if type(a).__module__.startswith("torch") and hasattr(a, "shape"):  # a tensor: its NumPy view
            a = as_array(a, f"mod_args[{i}]")
        refuse_masked_array(a, f"mod_args[{i}]")
        if isinstance(a, (np.ndarray, np.generic)) and a.dtype.itemsize == 2 and is_floating(a.dtype):
            kind = f"array (shape {a.shape})" if isinstance(a, np.ndarray) else "scalar"
            raise TypeError(
                f"mod_args[{i}] is a {a.dtype.name} {kind}; mods take float32 or float64 values: "
                "convert it (e.g. table.astype(np.float32), or table.float() in torch)"
            )
        if type(a) is int and not -(2**63) <= a < 2**63:
            if not 0 <= a < 2**64:
                raise ValueError(f"mod_args[{i}] = {a} does not fit in 64 bits (int64 or uint64)")
            a = np.uint64(a)
        out.append(native(a) if isinstance(a, np.ndarray) else a)
    return tuple(out)


def check_float(arr: Any, name: str) -> np.dtype:
    dtype = array_dtype(arr)
    if not is_floating(dtype):
        raise TypeError(
            f"{name} must have a floating dtype (float16, float32, float64, bfloat16), got {dtype} "
            f"with shape {tuple(arr.shape)}"
        )
    return dtype


def host_array(x, name: str):
    arr = as_array(x, name)
    if is_device_array(arr):
        raise TypeError(
            f"{name} must be a host array (an int, NumPy, a torch CPU tensor), got a device array: "
            "validation reads its values before anything is written (copying it from the GPU would "
            "synchronise)"
        )
    return arr


class DeviceArray:
    """What validation needs of a device array, read from its ``__cuda_array_interface__`` (no
    copy, no synchronisation): ``shape``, ``ndim``, ``dtype``, ``strides`` (bytes),
    ``flags.c_contiguous``/``flags.writeable`` and the byte range ``[ptr, ptr + nbytes)``.
    ``obj`` is the caller's array."""

    def __init__(self, obj):
        cai = obj.__cuda_array_interface__
        self.obj = obj
        self.shape = tuple(int(n) for n in cai["shape"])
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array_dtype(obj))
        c_strides, acc = [], self.dtype.itemsize
        for n in reversed(self.shape):
            c_strides.insert(0, acc)
            acc *= max(n, 1)
        given = cai.get("strides")
        self.strides = tuple(c_strides) if given is None else tuple(int(x) for x in given)
        contiguous = all(n == 1 or st == c for n, st, c in zip(self.shape, self.strides, c_strides))
        self.ptr = int(cai["data"][0])
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.flags = _Flags(contiguous, not cai["data"][1])


@dataclass(frozen=True)
class _Flags:
    c_contiguous: bool
    writeable: bool


def any_array(x, name: str):
    """A host array as ``np.ndarray``, a device array as :class:`DeviceArray`."""
    arr = as_array(x, name)
    return DeviceArray(arr) if is_device_array(arr) else arr


def caller_array(a):
    """The caller's array behind a validated one (device arrays are passed on as given)."""
    return a.obj if isinstance(a, DeviceArray) else a


def share_memory(a, b) -> bool:
    if isinstance(a, DeviceArray):
        return a.ptr < b.ptr + b.nbytes and b.ptr < a.ptr + a.nbytes
    return np.may_share_memory(a, b)


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
    if type(x) is np.ndarray or not is_device_array(x):
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
    if type(value) is np.ndarray:  # the common case: no library checks to pay for
        return value
    if array_api_compat.is_torch_array(value):
        value = value.detach().cpu()
        # NumPy has no bfloat16: widen it (exact) rather than fail; callers cast to their dtype
        return (value.float() if is_torch_bfloat16(value) else value).numpy()
    if array_api_compat.is_cupy_array(value):
        return value.get()
    if is_device_array(value) and hasattr(value, "copy_to_host"):  # Numba device array
        return value.copy_to_host()
    refuse_masked_array(value, what)
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
