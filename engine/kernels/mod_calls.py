"""The mods' loops: compiled per tuple of mods and called by address from a kernel's task, which is
then compiled once per argument types whatever the mods (and disk-cached).

A task used to be re-built per tuple of mods with the mods bound as its globals, so a new
``score_mod`` or ``mask_mod`` compiled the whole task again (the forward's 5.5-9 s, the
backward's 8.4 s on an AMD Zen 4; 28 of the 36 s the README's examples take). Now a kernel module
states its *mod loops*: small functions that run the mods over a tile or a row (the scores through
the ``score_mod``, the ``mask_mod``'s -inf, the derivatives), written over globals ``_SCORE_MOD``,
``_MASK_MOD``... that :class:`BoundLoops` binds per tuple of mods, as the task's were. The mods stay
inlined and vectorised inside their loop; the task calls the loop through its address
(:func:`mod_loop`), a few nanoseconds per tile or row.

The user's ``mod_args`` reach the task packed behind an address where their type allows
(:func:`erasable`: numbers, booleans, None, arrays and tuples of them): :func:`pack`, compiled per
their type, writes them as Numba lays the tuple out, the arrays borrowed (no reference counted:
they are the call's own arguments and outlive it), and each loop reads them back with the type it
was built for (:func:`user_args`). So neither the task nor its driver depends on the mods or on
their arguments' types (:func:`task_mod_args`); other types follow the loops' head as they are.

Safety: an address is called with exactly the argument types its loop was compiled for, or not at
all. Each address travels with a tag, a checksum of the types it was compiled for
(:func:`types_tag`); the call site's checksum is a constant of the compiled task, taken from the
types its arguments have there, and :func:`mod_loop` calls only when the two agree (else it
returns False and the task raises). The types a kernel module states for its loops
(:class:`ModLoop`) are checked that way on every call, and by the tests on every path.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..runtime.jit_cache import cache_enabled
from .specialise import cache_tag, named

__all__ = [
    "mod_loop",
    "call_address",
    "types_tag",
    "ModLoop",
    "BoundLoops",
    "row_types",
    "erasable",
    "task_mod_args_type",
    "task_mod_args",
    "pack",
    "packed_size",
    "user_args",
    "MOD_CALL_MISMATCH",
]

#: what a task raises when a loop's tag does not match its call site (an engine bug, never the user's)
MOD_CALL_MISMATCH = "internal error: a mod loop was compiled for other argument types than its call site passes"


def types_tag(argtys) -> int:
    """A checksum of these Numba types' names, the same in every process (0 is never one)."""
    return zlib.crc32(repr(tuple(str(t) for t in argtys)).encode()) + 1


def call_address(context, builder, address, argtys: tuple, values: list):
    """Emit a call, through Numba's calling convention, of the Numba-compiled function returning
    nothing at ``address`` (an LLVM i64) with ``values`` of types ``argtys``; its status (the
    caller propagates an error: ``context.call_conv.return_status_propagate``)."""
    fnty = context.call_conv.get_function_type(types.none, argtys)
    callee = builder.inttoptr(address, fnty.as_pointer())
    status, _ = context.call_conv.call_function(builder, callee, types.none, argtys, values)
    return status


@intrinsic
def mod_loop(typingctx, k, mod_args, *args):
    """Run loop ``k`` (a constant) of the mods on ``args``: ``mod_args`` is the task's, whose head
    holds each loop's (address, tag) pair. Calls the loop at the address with ``args`` if the tag
    is the :func:`types_tag` of the arguments' types here, and says True; True without a call
    where there is no loop (address 0: that mod is not given); False where the tag differs. An
    exception the loop raises propagates to the caller, as a direct call's would."""
    if not isinstance(k, types.IntegerLiteral) or not isinstance(mod_args, types.BaseTuple):
        return None  # Numba tries again with the constant's literal type
    if len(args) == 1 and isinstance(args[0], types.StarArgTuple):
        args = tuple(args[0].types)
    argtys = tuple(args)
    n = k.literal_value
    if tuple(mod_args)[2 * n : 2 * n + 2] != (types.int64, types.int64):  # no head of that many loops
        return None
    expected = types_tag(argtys)
    sig = types.boolean(k, mod_args, types.StarArgTuple.from_types(argtys))

    def codegen(context, builder, signature, llargs):
        values = [builder.extract_value(llargs[2], i) for i in range(len(argtys))]
        address = builder.extract_value(llargs[1], 2 * n)
        tag = builder.extract_value(llargs[1], 2 * n + 1)
        i64 = ir.IntType(64)
        absent = builder.icmp_signed("==", address, ir.Constant(i64, 0))
        matches = builder.icmp_signed("==", tag, ir.Constant(i64, expected))
        with builder.if_then(builder.and_(builder.not_(absent), matches), likely=True):
            status = call_address(context, builder, address, argtys, values)
            with builder.if_then(status.is_error, likely=False):
                context.call_conv.return_status_propagate(builder, status)
        return builder.or_(absent, matches)

    return sig, codegen


class ModLoop(NamedTuple):
    """One loop of a kernel's mods: ``fn`` (an ``njit`` function returning nothing, written over
    mod globals), ``reads`` (the names of the mod globals it is built over: bound, and in its
    disk-cache tag; the loop is built only when the first is set, else its address is 0), and
    ``types(args type, task mod_args type) -> its argument types``: those its call site in the
    task passes, for the kernel's argument namedtuple type and the task's ``mod_args`` type
    (:func:`task_mod_args_type`). A loop takes the task's ``mod_args`` whole and gives
    the mods ``_USER_ARGS(mod_args)``, the caller's (:func:`user_args`, bound with the mods)."""

    fn: object
    reads: tuple
    types: Callable


def task_mod_args_type(loops: int, mod_args_ty):
    """The type of a task's ``mod_args`` for the user's of type ``mod_args_ty``: the (address,
    tag) pairs of ``loops`` loops, then the address the user's are packed at (:func:`pack`) where
    their type is :func:`erasable`, else the user's entries."""
    if erasable(mod_args_ty):
        return types.UniTuple(types.int64, 2 * loops + 1)
    return types.BaseTuple.from_types((types.int64,) * (2 * loops) + tuple(mod_args_ty))


def erasable(ty) -> bool:
    """Whether ``mod_args`` of this Numba type can travel packed behind an address
    (:func:`pack`): numbers, booleans, None, arrays and tuples of them (no reference-counted
    object but arrays, whose references are dropped: the caller keeps the arrays alive)."""
    if isinstance(ty, types.BaseTuple):
        return all(erasable(t) for t in ty)
    return isinstance(ty, (types.Number, types.Boolean, types.NoneType, types.Array))


def _borrowed(context, builder, ty, value):
    """``value`` (of type ``ty``) with every array's meminfo and parent NULL: a view that counts no
    reference (Numba's incref and decref skip a NULL meminfo)."""
    if isinstance(ty, types.Array):
        ary = context.make_array(ty)(context, builder, value=value)
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()
    if isinstance(ty, types.BaseTuple):
        for n, t in enumerate(ty):
            value = builder.insert_value(value, _borrowed(context, builder, t, builder.extract_value(value, n)), n)
    return value


@intrinsic
def _store(typingctx, buf, value):
    """Write ``value`` (borrowed) into the memory of ``buf`` (a uint8 array of at least
    :func:`packed_size` bytes); its address."""
    if not isinstance(buf, types.Array) or not erasable(value):
        return None

    def codegen(context, builder, signature, llargs):
        data = context.make_array(buf)(context, builder, value=llargs[0]).data
        builder.store(
            _borrowed(context, builder, value, llargs[1]),
            builder.bitcast(data, context.get_value_type(value).as_pointer()),
        )
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(buf, value), codegen


@njit(cache=cache_enabled())
def pack(mod_args, buf):
    """``mod_args`` written into ``buf`` as Numba lays the tuple out, arrays borrowed; returns the
    address the mods' loops read it from (:func:`user_args`). Compiled once per type of
    ``mod_args``: the task and driver take the address, whatever the type."""
    return _store(buf, mod_args)


def packed_size(ty) -> int:
    """The bytes :func:`pack` writes for ``mod_args`` of Numba type ``ty``."""
    from numba.core.registry import cpu_target

    context = cpu_target.target_context
    return context.get_abi_sizeof(context.get_value_type(ty))


def user_args(user_ty, head: int, packed: bool):
    """An intrinsic ``f(mod_args) -> the user's mod_args`` for a mod loop, ``mod_args`` being the
    task's: its ``head`` ints, then either the address of the user's tuple of type ``user_ty``
    (``packed``: :func:`pack`; arrays borrowed, so no reference is counted) or the tuple's entries."""

    @intrinsic
    def _user_args(typingctx, mod_args):
        def codegen(context, builder, signature, llargs):
            if packed:
                address = builder.extract_value(llargs[0], head)
                return builder.load(builder.inttoptr(address, context.get_value_type(user_ty).as_pointer()))
            values = [builder.extract_value(llargs[0], head + n) for n in range(len(user_ty))]
            tup = context.make_tuple(builder, user_ty, values)
            context.nrt.incref(builder, user_ty, tup)  # the caller's reference is borrowed; this one is new
            return tup

        return user_ty(mod_args), codegen

    return _user_args


class BoundLoops:
    """A kernel's :class:`ModLoop` s bound to one tuple of mods (``mods``: each mod global's name
    to the mod, or None for none) and compiled per argument types: :meth:`head` gives the task's
    ``mod_args`` head, an ``(address, tag)`` pair per loop (``(0, 0)`` for a loop that is not
    built). ``mod_args`` whose type is :func:`erasable` reach the task packed behind an address
    (:func:`pack`), so that the task and its driver are compiled once per ``args`` type whatever
    the mods and their arguments; others as their entries after the head (the task then compiled
    per their type). A loop whose mods :func:`~engine.kernels.specialise.cache_tag` accepts is
    disk-cached."""

    def __init__(self, loops: tuple, mods: dict, options: dict):
        self.loops = loops
        self.head_size = 2 * len(loops)
        self.options = options
        self.own = [None if mods.get(loop.reads[0]) is None else {n: mods.get(n) for n in loop.reads} for loop in loops]
        self._dispatchers: dict = {}  # (user type, packed) -> one dispatcher per loop (None: not built)
        self._heads: dict = {}
        self._lock = threading.Lock()

    def head(self, args_ty, mod_args_ty) -> tuple:
        """``(address, tag)`` of each loop compiled for these types (the kernel's ``args`` and the
        user's ``mod_args``), flattened (ints)."""
        key = (args_ty, mod_args_ty)
        head = self._heads.get(key)
        if head is None:
            with self._lock:
                head = self._heads.get(key) or self._compile(args_ty, mod_args_ty)
                self._heads[key] = head
        return head

    def loops_for(self, mod_args_ty) -> list:
        """The loops' dispatchers for the user's ``mod_args`` of type ``mod_args_ty`` (None for a
        loop not built), built on first use."""
        packed = erasable(mod_args_ty)
        key = (mod_args_ty, packed)
        built = self._dispatchers.get(key)
        if built is None:
            built = self._dispatchers[key] = []
            # the user's type and the head are compiled in, not in the signature: both in the name
            # (part of Numba's cache key), with the packing
            digest = hashlib.sha256(str(mod_args_ty).encode()).hexdigest()[:16]
            suffix = f"{self.head_size}{'p' if packed else 't'}{digest}"
            for loop, own in zip(self.loops, self.own):
                if own is None:
                    built.append(None)
                    continue
                tag = cache_tag(*own.values())
                cache = {"cache": True} if tag else {}
                fn = getattr(loop.fn, "py_func", loop.fn)
                mods = {name: m for name, m in own.items() if m is not None}
                env = dict(fn.__globals__, _USER_ARGS=user_args(mod_args_ty, self.head_size, packed), **mods)
                name = f"{fn.__name__}_mods{suffix}"
                built.append(njit(**self.options, **cache)(named(fn.__code__, env, name, tag)))
        return built

    def _compile(self, args_ty, mod_args_ty) -> tuple:
        head = []
        task_mod_args_ty = task_mod_args_type(len(self.loops), mod_args_ty)
        for loop, dispatcher in zip(self.loops, self.loops_for(mod_args_ty)):
            if dispatcher is None:
                head += [0, 0]
                continue
            argtys = tuple(loop.types(args_ty, task_mod_args_ty))
            dispatcher.compile(argtys)
            compiled = dispatcher.overloads[argtys]
            address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
            if not address:
                raise RuntimeError(f"no address for the mod loop {dispatcher.py_func.__qualname__}{argtys}")
            head += [address, types_tag(argtys)]
        return tuple(head)

    @property
    def stats(self):
        """The loops' cache statistics, summed (Numba's ``Dispatcher.stats`` fields)."""
        hits, misses = {}, {}
        for built in self._dispatchers.values():
            for d in built:
                if d is not None:
                    for sig, n in d.stats.cache_hits.items():
                        hits[sig] = hits.get(sig, 0) + n
                    for sig, n in d.stats.cache_misses.items():
                        misses[sig] = misses.get(sig, 0) + n
        return SimpleNamespace(cache_hits=hits, cache_misses=misses)


def row_types(args_ty, field: str, ints: int, mod_args_ty) -> tuple:
    """The argument types of a mod loop over one row of scores: a 1-D C array of the dtype of the
    kernel's array ``field``, ``ints`` int64 indices, the task's ``mod_args``."""
    row = types.Array(args_ty.types[args_ty.fields.index(field)].dtype, 1, "C")
    return (row,) + (types.int64,) * ints + (mod_args_ty,)


def task_mod_args(loops, n_loops: int, args_ty, mod_args_ty):
    """``(type, make)``: the type of a task's ``mod_args`` for the user's of type ``mod_args_ty``
    (:func:`task_mod_args_type`), and ``make(mod_args) -> (task's mod_args, buffer)``, which
    builds them per call: the ``loops``' head (:class:`BoundLoops` compiled for ``args_ty``, or
    None without mods: zeros for ``n_loops`` loops), then the address of the buffer that
    :func:`pack` wrote the user's into (keep the buffer and the user's ``mod_args`` alive while
    the task runs) or the user's entries."""
    head = loops.head(args_ty, mod_args_ty) if loops is not None else (0, 0) * n_loops
    ty = task_mod_args_type(n_loops, mod_args_ty)
    if not erasable(mod_args_ty):

        def make(mod_args):
            return (*head, *mod_args), None

    elif loops is None:  # no loop reads them
        fixed = (*head, 0)

        def make(mod_args):
            return fixed, None

    else:
        packer = pack.compile((mod_args_ty, types.Array(types.uint8, 1, "C")))
        size = packed_size(mod_args_ty)

        def make(mod_args):
            buf = np.empty(size, np.uint8)
            return (*head, packer(mod_args, buf)), buf

    return ty, make
