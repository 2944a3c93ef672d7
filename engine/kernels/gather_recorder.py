"""A recorded gather: the array type a ``score_mod`` reads its learnable ``mod_args`` through in
the backward pass, so that every element it reads is known by its flat index and differentiated
by complex step.

``recorder(data, buf, offset, active)`` wraps a float array. Indexing it with as many integers as
it has dimensions (negative ones count from the end, as NumPy's) returns the element as a
complex128 and:

- with ``active < 0`` (the recording pass), appends the element's flat index (C order, plus
  ``offset``, the array's place in the caller's flat gradient buffer) to ``buf[1:]`` and counts
  the read in ``buf[0]`` (reads past the end of ``buf`` are counted, not stored);
- with ``active >= 0``, returns the element with imaginary part ``STEP`` if its flat index is
  ``active``, else 0: the mod evaluated on such reads gives ``Im f / STEP = df / d element``
  (complex-step differentiation, exact to rounding for a mod analytic in the element).

Fewer integers than dimensions give the sub-array as a recorder (``tab[h][d]`` works as
``tab[h, d]``); ``shape``, ``ndim``, ``size`` and ``len()`` are the array's. Anything else (slices,
``tab.sum()``, passing it to a NumPy function, comparing an element) does not compile: the
backward then names the mod and the operation. :class:`PyGatherRecorder` is the same for Python
(the ``reference`` backend).
"""

import operator

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, overload_attribute, register_jitable, register_model

from .score_grad import STEP

__all__ = ["GatherRecorderType", "recorder", "PyGatherRecorder"]


class GatherRecorderType(types.Type):
    """The Numba type of a recorded gather over arrays of type ``array_type``."""

    def __init__(self, array_type):
        self.array_type = array_type
        super().__init__(name=f"GatherRecorder({array_type})")


_FIELDS = {"buf": types.int64[::1], "offset": types.int64, "active": types.int64}


@register_model(GatherRecorderType)
class _GatherRecorderModel(models.StructModel):
    def __init__(self, dmm, fe_type):
        members = [("data", fe_type.array_type)] + list(_FIELDS.items())
        super().__init__(dmm, fe_type, members)


@intrinsic
def recorder(typingctx, data, buf, offset, active):
    """A :class:`GatherRecorderType` over ``data`` (a float array)."""
    if not (isinstance(data, types.Array) and isinstance(data.dtype, types.Float)):
        return None
    rt = GatherRecorderType(data)
    sig = rt(data, buf, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        rec = cgutils.create_struct_proxy(rt)(context, builder)
        rec.data, rec.buf, rec.offset, rec.active = args
        context.nrt.incref(builder, signature.args[0], args[0])
        context.nrt.incref(builder, signature.args[1], args[1])
        return rec._getvalue()

    return sig, codegen


def _getter(name):
    @intrinsic
    def get(typingctx, rec):
        if not isinstance(rec, GatherRecorderType):
            return None
        ty = rec.array_type if name == "data" else _FIELDS[name]

        def codegen(context, builder, signature, args):
            value = getattr(cgutils.create_struct_proxy(rec)(context, builder, value=args[0]), name)
            if name in ("data", "buf"):
                context.nrt.incref(builder, ty, value)
            return value

        return ty(rec), codegen

    return get


_data, _buf, _offset, _active = (_getter(n) for n in ("data", "buf", "offset", "active"))


@overload_attribute(GatherRecorderType, "shape")
def _shape(rec):
    return lambda rec: _data(rec).shape


@overload_attribute(GatherRecorderType, "ndim")
def _ndim(rec):
    nd = rec.array_type.ndim
    return lambda rec: nd


@overload_attribute(GatherRecorderType, "size")
def _size(rec):
    return lambda rec: _data(rec).size


@overload(len)
def _len(rec):
    if isinstance(rec, GatherRecorderType):
        return lambda rec: len(_data(rec))
    return None


@overload(operator.getitem)
def _getitem(rec, idx):
    if not isinstance(rec, GatherRecorderType):
        return None
    nd = rec.array_type.ndim
    if isinstance(idx, types.Integer):
        n = 1
    elif isinstance(idx, types.BaseTuple) and len(idx) > 0 and all(isinstance(t, types.Integer) for t in idx):
        n = len(idx)
    else:
        return None  # slices, arrays, ...: not a gather the backward can differentiate
    if n > nd:
        return None
    return _getitem_impl(n, nd)


_impls: dict = {}


def _getitem_impl(n: int, nd: int):
    """The getitem of an ``nd``-dimensional recorder by ``n`` integers, written out (the flat
    index unrolled over the index tuple, whose members may differ in integer type)."""
    impl = _impls.get((n, nd))
    if impl is not None:
        return impl
    ii = ["idx"] if n == 1 else [f"idx[{k}]" for k in range(n)]
    lines = ["    f = 0"]
    for k in range(n):
        lines.append(f"    x = np.int64({ii[k]})")
        lines.append(f"    f = f * shape[{k}] + (x + shape[{k}] if x < 0 else x)")
    lines += [f"    f *= shape[{k}]" for k in range(n, nd)]
    flat = "def flat(shape, idx):\n" + "\n".join(lines) + "\n    return f\n"
    env = {
        "np": np,
        "recorder": recorder,
        "STEP": STEP,
        "_data": _data,
        "_buf": _buf,
        "_offset": _offset,
        "_active": _active,
    }
    exec(compile(flat, f"<gather flat {n} of {nd}>", "exec"), env)
    env["flat"] = register_jitable(env["flat"])
    exec(compile(_SUB if n < nd else _ELEMENT, f"<gather getitem {n} of {nd}>", "exec"), env)
    impl = _impls[(n, nd)] = env["impl"]
    return impl


# a sub-array: its own recorder, offset by where it starts
_SUB = """
def impl(rec, idx):
    d = _data(rec)
    return recorder(d[idx], _buf(rec), _offset(rec) + flat(d.shape, idx), _active(rec))
"""

_ELEMENT = """
def impl(rec, idx):
    d = _data(rec)
    v = np.float64(d[idx])
    f = _offset(rec) + flat(d.shape, idx)
    active = _active(rec)
    if active < 0:  # recording: note the read
        buf = _buf(rec)
        count = buf[0]
        if count < buf.shape[0] - 1:
            buf[count + 1] = f
        buf[0] = count + 1
        return complex(v, 0.0)
    return complex(v, STEP if f == active else 0.0)
"""


class PyGatherRecorder:
    """The recorded gather in Python, for the ``reference`` backend: ``reads`` receives the flat
    indices (plus ``offset``) read while ``active`` is None; with ``active`` set, that element
    comes back with imaginary part ``STEP``."""

    __slots__ = ("data", "offset", "reads", "active")

    def __init__(self, data: np.ndarray, offset: int, reads: list, active):
        self.data, self.offset, self.reads, self.active = data, offset, reads, active

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        ii = idx if isinstance(idx, tuple) else (idx,)
        if not ii or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ii):
            raise TypeError(f"mod_args that take a gradient are read by integer indices only, got {idx!r}")
        shape = self.data.shape
        f = 0
        for k, x in enumerate(ii):
            f = f * shape[k] + (int(x) + shape[k] if x < 0 else int(x))
        for k in range(len(ii), len(shape)):
            f *= shape[k]
        value = self.data[idx]
        f += self.offset
        if len(ii) < len(shape):
            return PyGatherRecorder(value, f, self.reads, self.active)
        if self.active is None:
            self.reads.append(f)
            return complex(float(value), 0.0)
        return complex(float(value), STEP if f == self.active else 0.0)
