"""One driver for every tuple of mods: the driver calls the kernel's task through its address.

A kernel is its per-task function (the task) and a driver that splits the work into tasks (a
``prange`` loop, or a plain loop for small calls). Numba compiles a callee into each caller's
library and optimises the linked module again, so a driver that called its task directly would
re-optimise and re-emit the whole task: 4 s of a parallel forward's 9.5 s, 1 s of a serial one's
6.5 (Intel Xeon, one thread). Here the driver is built once per kernel, compiled once per
argument types (and disk-cached, whatever the mods), and takes the task's address in front of
``mod_args`` (with a flag it sets when the task raises), so the serial and the parallel driver
share one compiled task. The indirect call costs nothing beside a task (one or more tiles). The
task is the same for every tuple of mods too: it calls the mods' loops by address in turn
(``engine.kernels.mod_calls``), whose addresses and tags lead its ``mod_args``.

The driver's code is the plain kernel's, with its task global bound to a trampoline that takes
the address from ``mod_args[0]`` and the flag from ``mod_args[1]`` and calls the task, with
``mod_args[2:]``, through Numba's calling convention (:func:`_call_task`). The task must be
compiled for exactly the types the trampoline passes: :class:`TaskKernel` compiles it for
``task_types(args type, task mod_args type)``, which the kernel module states, and checks that
``mod_args[2:]`` types as the task's ``mod_args`` do. The address is an argument of every call,
never a constant of the compiled code, so the disk-cached driver holds no address of the process
that compiled it. (The task passed as a Numba first-class function instead would put a function
type in the driver's signature, which the disk cache cannot match in the next process; see
``engine.kernels.mod_kernels``.)
"""

from __future__ import annotations

import ctypes
import threading

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..runtime.jit_cache import cache_enabled
from .mod_calls import call_address, task_mod_args
from .specialise import named

__all__ = ["TaskKernel", "via_driver", "field_dtype", "vector", "return_types", "raise_cause", "rerun_serially"]


@intrinsic
def _call_task(typingctx, address, failed, *task_args):
    """Call the Numba-compiled function at ``address`` (int64) with ``task_args``; it returns
    nothing. If it raises, the byte at ``failed`` (an int64 address) is set to 1 and the exception propagates
    to the caller, as a direct call's would. (Numba drops an exception raised in a parallel loop's
    worker thread; only the flag tells the caller then.)"""
    if address != types.int64 or failed != types.int64:
        return None
    if len(task_args) == 1 and isinstance(task_args[0], types.StarArgTuple):
        task_args = tuple(task_args[0].types)
    argtys = tuple(task_args)
    sig = types.none(address, failed, types.StarArgTuple.from_types(argtys))

    def codegen(context, builder, signature, llargs):
        packed = llargs[2]
        values = [builder.extract_value(packed, i) for i in range(len(argtys))]
        status = call_address(context, builder, llargs[0], argtys, values)
        with builder.if_then(status.is_error, likely=False):
            flag = builder.inttoptr(llargs[1], ir.IntType(8).as_pointer())
            builder.store(ir.Constant(ir.IntType(8), 1), flag)
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return sig, codegen


# one trampoline per task signature shape (number of arguments, position of mod_args), e.g.
# (task, args, mod_args) or (task, slot, args, mod_args, per_tile); mod_args arrive as
# (address, failed flag, *mod_args)
@njit(inline="always")
def _via_3(a0, a1, ext):
    _call_task(ext[0], ext[1], a0, a1, ext[2:])


@njit(inline="always")
def _via_4(a0, a1, ext, a3):
    _call_task(ext[0], ext[1], a0, a1, ext[2:], a3)


@njit(inline="always")
def _via_5(a0, a1, a2, ext, a4):
    _call_task(ext[0], ext[1], a0, a1, a2, ext[2:], a4)


@njit(inline="always")
def _via_4_3(a0, a1, a2, ext):
    _call_task(ext[0], ext[1], a0, a1, a2, ext[2:])


@njit(inline="always")
def _via_7(a0, a1, a2, a3, a4, a5, ext):
    _call_task(ext[0], ext[1], a0, a1, a2, a3, a4, a5, ext[2:])


_TRAMPOLINES = {(3, 2): _via_3, (4, 2): _via_4, (4, 3): _via_4_3, (5, 3): _via_5, (7, 6): _via_7}


def field_dtype(args_ty, name: str):
    """The Numba dtype of the array field ``name`` of a kernel's argument namedtuple type."""
    return args_ty.types[args_ty.fields.index(name)].dtype


def vector(dtype):
    """The type of ``np.empty(n, dtype)`` in a kernel: a 1-D C array."""
    return types.Array(dtype, 1, "C")


def return_types(dispatcher, args_ty) -> tuple:
    """The element types of the tuple ``dispatcher(args)`` returns (it is compiled for
    ``args_ty`` if it was not), for the task arguments a driver derives from its arguments."""
    dispatcher.compile((args_ty,))
    return tuple(dispatcher.overloads[(args_ty,)].signature.return_type)


def via_driver(driver, task, options: dict, serial: bool):
    """``driver``'s code with its ``task`` global bound to the trampoline for the task's
    signature, under the name ``<driver>_via`` (``_via_serial`` without ``parallel``); disk-cached
    like the plain driver. Its second argument is ``(task address, failed flag, *mod_args)``."""
    code = task.py_func.__code__
    params = code.co_varnames[: code.co_argcount]
    trampoline = _TRAMPOLINES[(len(params), params.index("mod_args"))]
    fn = driver.py_func
    env = dict(fn.__globals__, **{task.py_func.__name__: trampoline})
    name = fn.__name__ + ("_via_serial" if serial else "_via")
    return njit(parallel=not serial, cache=cache_enabled(), **options)(named(fn.__code__, env, name, None))


#: the failure flag reaches the kernel as its address (an int64 converts faster than an array)
_FLAG_TY = types.int64
_flags = threading.local()


def _new_flag() -> tuple:
    """``(flag, address, view)``: a one-byte ``bytearray`` set to 0, the address of its byte and
    the ctypes view that holds its buffer; the address is valid while the triple is alive."""
    flag = bytearray(1)
    view = (ctypes.c_uint8 * 1).from_buffer(flag)
    return flag, ctypes.addressof(view), view


def _thread_flag() -> tuple:
    """This thread's failure flag, ``(flag, address, view)`` of :func:`_new_flag`: a thread runs
    one kernel at a time, so one flag per thread serves every call (a new array per call cost
    0.15 of a small call's 5 us; a ``bytearray`` reads faster than a NumPy array's item)."""
    try:
        return _flags.failed
    except AttributeError:
        _flags.failed = _new_flag()
        return _flags.failed


def raise_cause(error: SystemError):
    """What a mod raises inside a parallel loop (on the calling thread) reaches Python as Numba's
    SystemError ("returned a result with an exception set") caused by the mod's exception: raise
    the mod's exception, as a serial call does; any other SystemError as it is."""
    cause = error.__cause__
    if isinstance(cause, Exception) and not isinstance(cause, SystemError):
        raise cause from None
    raise error


def rerun_serially(entry, args: tuple, name: str) -> None:
    """Run a parallel kernel's serial build ``entry(*args)`` after a worker thread of its parallel
    loop raised (Numba drops such an exception), so that the exception is raised on the calling
    thread; if it is not raised again (a mod that raises only sometimes), say so. The serial build,
    not the parallel one on one thread: Numba's ``workqueue`` layer still runs a parallel loop in
    a worker thread when set to one thread."""
    try:
        entry(*args)
    except SystemError as e:
        raise_cause(e)
    raise RuntimeError(
        f"a score_mod or mask_mod raised an exception in a task of {name} run by a worker thread, "
        "where Numba cannot pass it on, and did not raise again when run on the calling thread; "
        "call with backend='reference' to see it"
    )


class TaskKernel:
    """A kernel: ``via`` (:func:`via_driver`) bound to ``task`` (the kernel's task dispatcher) and
    to the mods' ``loops`` (``engine.kernels.mod_calls.BoundLoops``, None without mods; the kernel
    has ``n_loops`` of them). Called as the plain kernel is, ``kernel(args, mod_args)``; it also answers
    ``typeof_pyval`` and ``compile(signature) -> entry`` as a dispatcher does, so that
    ``engine.runtime.entry_points.canonical_entry`` compiles it once per dtype and the call plans
    call the entry directly. A TaskKernel is called under the caller's thread guard, as a
    dispatcher is (``kernel_call_guard`` picks Numba's threading layer before a compile starts it).
    """

    def __init__(self, via, task, task_types, serial_via=None, *, loops=None, n_loops: int = 0):
        self.via = via
        self.task = task
        self.task_types = task_types
        # the mods' loops (engine.kernels.mod_calls.BoundLoops; None: no mods), whose addresses
        # and tags lead the task's mod_args, n_loops pairs (0, 0 for a loop not built)
        self.loops = loops
        self.n_loops = n_loops
        # () -> the serial build of ``via``: a flagged parallel call runs again on it
        self.serial_via = serial_via
        self._runs: dict = {}

    def typeof_pyval(self, value):
        return self.via.typeof_pyval(value)

    @property
    def stats(self):
        """The cache statistics (Numba's ``Dispatcher.stats``) of the part built per mods: the
        mods' loops where the kernel has them, else the task."""
        return self.loops.stats if self.loops is not None else self.task.stats

    @property
    def targetoptions(self) -> dict:
        """The driver's (``parallel`` says whether a call wakes the thread pool)."""
        return self.via.targetoptions

    @property
    def signatures(self) -> list:
        """The (args type, mod_args type) signatures compiled or loaded so far."""
        return list(self._runs)

    def compile(self, signature):
        """Compile (or load) the driver for ``signature`` = (args type, mod_args type) and the
        task for the matching types; the entry ``entry(args, mod_args)`` calls the pair."""
        signature = tuple(signature)
        run = self._runs.get(signature)
        if run is None:
            run = self._runs.setdefault(signature, self._compile(*signature))
        return run

    def _compile(self, args_ty, mod_args_ty):
        # the task's mod_args (engine.kernels.mod_calls): the mods' loops' (address, tag) pairs,
        # then the address the user's mod_args are packed at, so that one task and one driver per
        # args type serve every tuple of mods and none (without mods: zeros); mod_args of a type
        # that cannot be packed follow the pairs as they are (a task per type)
        task_mod_args_ty, make = task_mod_args(self.loops, self.n_loops, args_ty, mod_args_ty)
        ext_ty = types.BaseTuple.from_types((types.int64, _FLAG_TY) + tuple(task_mod_args_ty))
        # what the trampoline passes the task: must be the type the task is compiled for
        if types.BaseTuple.from_types(tuple(ext_ty)[2:]) != task_mod_args_ty:
            raise RuntimeError(f"mod_args of type {mod_args_ty} do not round-trip through {ext_ty}")
        entry = self.via.compile((args_ty, ext_ty))
        task_sig = tuple(self.task_types(args_ty, task_mod_args_ty))
        self.task.compile(task_sig)
        compiled = self.task.overloads[task_sig]
        address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
        if not address:
            raise RuntimeError(f"no address for the task {self.task.py_func.__qualname__}{task_sig}")
        name = self.task.py_func.__qualname__

        def run(args, mod_args):
            failed, flag_address, _ = _thread_flag()  # 0 between calls: cleared whenever set
            # the buffer and mod_args, whose arrays it borrows, live to the end of the call
            task_args, buf = make(mod_args)  # noqa: F841  (buf: kept alive)
            try:
                entry(args, (address, flag_address, *task_args))
            except SystemError as e:
                failed[0] = 0
                raise_cause(e)
            except BaseException:
                failed[0] = 0
                raise
            if failed[0]:
                failed[0] = 0
                # raised in a worker thread, where Numba drops it: run again on the serial driver,
                # where it propagates (the outputs of a call that raises are not used)
                serial = self.serial_via().compile((args_ty, ext_ty)) if self.serial_via else entry
                spare = _new_flag()
                rerun_serially(serial, (args, (address, spare[1], *task_args)), name)

        return run

    def entry_point_for(self, args: tuple):
        """The compiled run for ``args`` = (args, mod_args) of these types, or None (not compiled
        yet): what ``engine.runtime.entry_points.resolve_entry_point`` gives a call plan's
        ``Bound``, so that its later calls skip typing the arguments."""
        try:
            return self._runs.get((self.via.typeof_pyval(args[0]), self.via.typeof_pyval(args[1])))
        except Exception:  # a value Numba cannot type: the call itself will say so
            return None

    def __call__(self, args, mod_args):
        """A call with the arguments' own types (the cpu ops call the entry of their canonical
        types instead, ``engine.runtime.entry_points.canonical_entry``)."""
        signature = (self.via.typeof_pyval(args), self.via.typeof_pyval(mod_args))
        run = self._runs.get(signature) or self.compile(signature)
        return run(args, mod_args)
