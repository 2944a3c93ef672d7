"""The ``cpu`` backend's decode op: lays out a validated ``DecodeProblem`` for the split-KV kernel
(``engine.kernels.cpu.decode``)."""

from __future__ import annotations

import math
import operator

import numpy as np

from ...kernels.cpu.half_floats import BFLOAT16_BITS, FLOAT16_BITS
from ...kernels.seqlens import _seqlens_k
from ...problems.decode import DecodeProblem
from ...problems.mods import compile_mods_alone
from ...runtime.config import (
    CPU_SERIAL_MAX_WORK,
    DECODE_BLOCK_K,
    DECODE_BLOCK_ROWS,
    DECODE_FUSED_ROWS,
)
from ...runtime.entry_points import Bound
from ...runtime.threads import get_num_threads, kernel_call_guard
from ..base import Op
from ..kvcache import new_entries_written, pick_num_splits
from .autotune import tune_decode_order
from .blas_pin import get_blas_pin
from .varlen import attend_packed

__all__ = ["CpuDecode"]


def _pages(cache: np.ndarray) -> np.ndarray:
    """The cache as (pages, Hkv, page_size, D) of the compute dtype or uint16 bits (no copy)."""
    return cache.view(np.uint16) if cache.dtype.itemsize == 2 else cache


_kernel_module = None


def _kernels():
    """The kernel module, imported on first use (``import engine`` compiles nothing)."""
    global _kernel_module
    if _kernel_module is None:
        from ...kernels.cpu import decode as cpu_decode

        _kernel_module = cpu_decode
    return _kernel_module


class CpuDecode(Op):
    problem_type = DecodeProblem
    dtypes = ("float16", "float32", "float64", "bfloat16")
    cache_dtypes = ("float16", "float32", "float64", "bfloat16")
    supports_mods = True
    supports_cu_seqlens_q = True

    def run(self, problem: DecodeProblem):
        """Write the new entries, then run the kernel; ``(out, lse)`` in the query's dtype. If
        anything after the write raises (a mod Numba cannot compile, an allocation), the written
        slots get their old contents back first. Packed queries (``cu_seqlens_q``) run on the
        ragged kernel (``varlen.attend_packed``)."""
        if problem.packed:
            with new_entries_written(problem):
                return attend_packed(problem)
        return _launch(_setup(problem), problem)

    def prepare(self, problem: DecodeProblem):
        """A runner for later problems with this one's signature (``engine.plan``): the layout,
        the kernel arguments that the signature fixes and (after the first call) the kernel's
        entry points, worked out once. None for device arrays and packed queries."""
        if problem.on_device or problem.packed:
            return None
        setup = _setup(problem)
        setup.kernels = tuple(Bound(k) for k in setup.kernels)
        setup.write, setup.restore, setup.seqlens_k = (Bound(k) for k in (setup.write, setup.restore, setup.seqlens_k))
        return _Prepared(setup, problem)


#: the kernel arguments each call sets (the others are the signature's, set once in ``_setup``),
#: under the general kernel's names and the GEMV kernel's (which has no page table)
#: (the scale too: a call plan's later calls may pass another)
_PER_CALL = (
    "q",
    "k_pages",
    "v_pages",
    "page_table",
    "seqlens_k",
    "scale",
    "splits",
    "part_out",
    "part_lse",
    "out",
    "lse",
)
_GEMV_PER_CALL = (
    "q",
    "k_cache",
    "v_cache",
    "page_table",
    "seqlens_k",
    "scale",
    "splits",
    "part_out",
    "part_lse",
    "out",
    "lse",
)


def uses_gemv(problem: DecodeProblem) -> bool:
    """Whether the GEMV kernel (``engine.kernels.cpu.decode_gemv``) runs this problem: a contiguous
    cache of the compute dtype, no mods, at most ``DECODE_FUSED_ROWS`` rows per cache head."""
    return (
        problem.page_table is None
        and problem.cache_dtype == problem.compute_dtype
        and not problem.has_mods
        and problem.group * problem.L <= DECODE_FUSED_ROWS
    )


class _Setup:
    """What a decode problem's signature decides (:func:`_setup`)."""

    __slots__ = (
        "compute",
        "direct_q",
        "table",
        "tasks",
        "threads",
        "splits",
        "shapes",
        "template",
        "pick",
        "args_type",
        "kernels",
        "write",
        "restore",
        "seqlens_k",
        "small",
        "work_per_key",
        "fast_write",
        "bits",
        "cast",
        "gemv",
    )


def _setup(problem: DecodeProblem) -> _Setup:
    B, Hq, L, Ev = problem.batch, problem.num_q_heads, problem.L, problem.Ev
    setup = _Setup()
    setup.compute = compute = problem.compute_dtype
    q = problem.query
    setup.direct_q = q.dtype == compute and q.flags.c_contiguous
    half_kind = 0
    if problem.cache_dtype.itemsize == 2:
        half_kind = FLOAT16_BITS if problem.cache_dtype == np.float16 else BFLOAT16_BITS
    setup.table = np.arange(B, dtype=np.int32).reshape(B, 1) if problem.page_table is None else None
    group = problem.group
    setup.tasks = B * problem.num_kv_heads * math.ceil(group * L / DECODE_BLOCK_ROWS)
    setup.threads = get_num_threads()
    setup.splits = problem.num_splits
    N = B * Hq * L
    setup.shapes = ((N, Ev), (N,), problem.out_shape, problem.lse_shape)
    left, right = problem.window
    fixed = dict(
        causal=problem.is_causal,
        left=left,
        right=right,
        group=group,
        half_kind=half_kind,
        gather=bool(half_kind or problem.page_table is not None),
        block_k=DECODE_BLOCK_K,
        block_rows=DECODE_BLOCK_ROWS,
        fused_rows=DECODE_FUSED_ROWS,
        has_score_mod=problem.score_mod is not None,
        has_mask_mod=problem.mask_mod is not None,
    )
    per_call = _PER_CALL
    if uses_gemv(problem):
        from ...kernels.cpu import decode_gemv

        per_call, args_type = _GEMV_PER_CALL, decode_gemv.GemvArgs
        fixed = {k: fixed[k] for k in ("causal", "left", "right", "group", "block_k")}
        fixed["sequential"] = tune_decode_order(compute)  # measured once per machine and dtype
        setup.kernels = tuple(decode_gemv.gemv_kernel(serial) for serial in (0, 1))
        setup.gemv = True  # it writes (B, Hq, L, Dv) itself, and allocates its split-KV parts
    else:  # the parallel and the serial build; a prepared runner calls their entry points once known
        setup.gemv = False
        args_type = _kernels().DecodeArgs
        compile_mods_alone(problem.score_mod, problem.mask_mod, problem.mod_args, compute)
        setup.kernels = tuple(_kernels().decode_kernel(problem.score_mod, problem.mask_mod, s) for s in (0, 1))
    setup.args_type = args_type
    fields = args_type._fields
    setup.template = tuple(fixed[name] for name in fields if name not in per_call)
    order = [n for n in fields if n not in per_call] + list(per_call)
    setup.pick = operator.itemgetter(*(order.index(name) for name in fields))
    # few rows per task: the kernel's own loops, no BLAS call, so nothing to pin (it costs microseconds)
    setup.small = group * L <= DECODE_FUSED_ROWS
    setup.work_per_key = problem.num_q_heads * L * (problem.E + Ev)
    setup.bits = problem.cache_dtype.itemsize == 2  # 16-bit caches reach the kernels as uint16 bits
    setup.cast = problem.dtype != compute
    # the new entries copied by a compiled loop when no conversion is needed (bits for bits)
    setup.fast_write = problem.key is not None and problem.L_new > 0 and problem.key.dtype == problem.cache_dtype
    from ...kernels.cpu.cache_write import _restore, _save_and_write

    setup.write, setup.restore, setup.seqlens_k = _save_and_write, _restore, _seqlens_k
    return setup


def _write_copies(k_pages, v_pages, table, seqlens_k, key, value, old_k, old_v) -> None:
    """The write of new entries that lie in a cache's memory (``_save_and_write`` returned False):
    from copies, so every slot gets what the entries held before the call. Through the
    dispatcher, not a plan's entry point: that one takes exactly the first call's types, and a
    copy may differ from the view in layout or flags (rare: views of the caches as new entries)."""
    from ...kernels.cpu.cache_write import _save_and_write

    _save_and_write(k_pages, v_pages, table, seqlens_k, key.copy(), value.copy(), old_k, old_v)


def _launch(setup: _Setup, problem: DecodeProblem):
    """Allocate everything, write the new entries, then run the kernel; if the kernel raises, the
    written slots get their old contents back before the error propagates."""
    compute = setup.compute
    q = problem.query if setup.direct_q else np.ascontiguousarray(problem.query, dtype=compute)
    table = setup.table
    if table is None:
        table = np.ascontiguousarray(problem.page_table, dtype=np.int32)
    seqlens_k = np.empty(problem.batch, dtype=np.int64)
    most, total = setup.seqlens_k(problem.cache_seqlens, problem.L_new, seqlens_k)
    splits = setup.splits
    if splits is None:
        splits = 1 if setup.tasks >= setup.threads else pick_num_splits(setup.tasks, most, setup.threads)
    splits = min(splits, max(1, most))  # a split with no key does nothing
    (N, Ev), lse_n, out_shape, lse_shape = setup.shapes
    part_out = part_lse = None
    if setup.gemv:  # the GEMV kernel writes the output's own shape and holds its parts itself
        out = np.empty(out_shape, dtype=compute)
        lse = np.empty(lse_shape, dtype=compute)
    else:
        out = np.empty((N, Ev), dtype=compute)
        lse = np.empty(lse_n, dtype=compute)
        if splits > 1:
            part_out = np.empty((splits, N, Ev), dtype=compute)
            part_lse = np.empty((splits, N), dtype=compute)
        else:
            part_out, part_lse = out.reshape(1, N, Ev), lse.reshape(1, N)
    # keys read: tiny calls run serially (the thread pool's wake-up costs more than it gains)
    serial = int(splits == 1 and total * setup.work_per_key <= CPU_SERIAL_MAX_WORK)
    k_pages, v_pages = problem.k_cache, problem.v_cache
    if setup.bits:
        k_pages, v_pages = _pages(k_pages), _pages(v_pages)
    per_call = (q, k_pages, v_pages, table, seqlens_k, problem.scale, splits, part_out, part_lse, out, lse)
    args = tuple.__new__(setup.args_type, setup.pick(setup.template + per_call))
    kernel = setup.kernels[serial]
    if setup.fast_write:  # a compiled copy; the old contents back if the kernel fails
        key, value = _bits(problem.key), _bits(problem.value)
        old_k, old_v = np.empty(key.shape, key.dtype), np.empty(value.shape, value.dtype)
        if not setup.write(k_pages, v_pages, table, seqlens_k, key, value, old_k, old_v):
            _write_copies(k_pages, v_pages, table, seqlens_k, key, value, old_k, old_v)
        try:
            _run_kernel(setup.small, kernel, args, problem.mod_args)
        except BaseException:
            setup.restore(k_pages, v_pages, table, seqlens_k, old_k, old_v)
            raise
    elif problem.key is not None:
        with new_entries_written(problem):  # NumPy's conversion to the cache dtype
            _run_kernel(setup.small, kernel, args, problem.mod_args)
    else:
        _run_kernel(setup.small, kernel, args, problem.mod_args)
    out = out.reshape(out_shape)
    lse = lse.reshape(lse_shape)
    if setup.cast:
        out, lse = out.astype(problem.dtype), lse.astype(problem.dtype)
    return out, lse


def _run_kernel(small: bool, kernel, args, mod_args) -> None:
    """The kernel call under the thread guard; BLAS held at one thread unless the tasks are
    small enough to need no BLAS call (the pin costs microseconds)."""
    if small:
        with kernel_call_guard():
            kernel(args, mod_args)
    else:
        with kernel_call_guard(), get_blas_pin()():
            kernel(args, mod_args)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


class _Prepared:
    """A prepared runner (:meth:`CpuDecode.prepare`): :func:`_launch` with the setup done once,
    and ``plain``, the shorter path where the plan's checks hand over the per-call arrays and
    values directly (None where the signature needs more: a page table, 16-bit caches, a query
    to convert, new entries to convert)."""

    __slots__ = ("setup", "plain")

    def __init__(self, setup: _Setup, problem: DecodeProblem):
        self.setup = setup
        plain = setup.direct_q and problem.page_table is None and not setup.bits and not setup.cast
        self.plain = _Plain(setup, problem) if plain and (problem.key is None or setup.fast_write) else None

    def __call__(self, problem: DecodeProblem):
        return _launch(self.setup, problem)


class _Plain:
    """``(out, lse)`` of a call given its arrays, its ``seqlens_k`` (int64 ``cache_seqlens + L_new``,
    checked against the capacity), their max and sum, the scale and ``mod_args``: :func:`_launch`'s
    work without a problem object, through the kernels' entry points, with no thread guard around
    the serial kernel (it does not use Numba's thread pool)."""

    __slots__ = ("setup", "write", "dtype", "guarded", "pin", "gemv", "shapes")

    def __init__(self, setup: _Setup, problem: DecodeProblem):
        self.setup = setup
        self.gemv = setup.gemv
        self.write = problem.key is not None
        self.dtype = setup.compute
        self.pin = None if setup.small else get_blas_pin()
        # the thread guard around the parallel kernel and the pinned BLAS; the serial kernel alone
        # with no BLAS call needs neither
        self.guarded = (True, True) if self.pin is not None else (True, False)
        self.shapes = setup.shapes

    def __call__(self, q, k_cache, v_cache, key, value, seqlens_k, most, total, scale, mod_args):
        setup = self.setup
        splits = setup.splits
        if splits is None:
            splits = 1 if setup.tasks >= setup.threads else pick_num_splits(setup.tasks, most, setup.threads)
        if splits > most:
            splits = max(1, most)  # a split with no key does nothing
        (N, Ev), lse_n, out_shape, lse_shape = self.shapes
        dtype = self.dtype
        part_out = part_lse = None
        if self.gemv:  # the output's own shape, written by the kernel (which holds its parts)
            out = np.empty(out_shape, dtype)
            lse = np.empty(lse_shape, dtype)
        elif splits > 1:
            out = np.empty((N, Ev), dtype)
            lse = np.empty(lse_n, dtype)
            part_out = np.empty((splits, N, Ev), dtype)
            part_lse = np.empty((splits, N), dtype)
        else:
            part_out = np.empty((1, N, Ev), dtype)
            part_lse = np.empty((1, N), dtype)
            out, lse = part_out[0], part_lse[0]
        serial = splits == 1 and total * setup.work_per_key <= CPU_SERIAL_MAX_WORK
        args = tuple.__new__(
            setup.args_type,
            setup.pick(
                setup.template
                + (q, k_cache, v_cache, setup.table, seqlens_k, scale, splits, part_out, part_lse, out, lse)
            ),
        )
        kernel = setup.kernels[1 if serial else 0]
        call = kernel.entry or kernel
        guard = self.guarded[serial]
        if self.write:  # a compiled copy; the old contents back if the kernel fails
            old_k, old_v = np.empty(key.shape, key.dtype), np.empty(value.shape, value.dtype)
            write = setup.write
            if not (write.entry or write)(k_cache, v_cache, setup.table, seqlens_k, key, value, old_k, old_v):
                _write_copies(k_cache, v_cache, setup.table, seqlens_k, key, value, old_k, old_v)
            try:
                if guard:
                    self._guarded(call, args, mod_args)
                else:
                    call(args, mod_args)
            except BaseException:
                setup.restore(k_cache, v_cache, setup.table, seqlens_k, old_k, old_v)
                raise
        elif guard:
            self._guarded(call, args, mod_args)
        else:
            call(args, mod_args)
        if self.gemv:
            return out, lse
        return out.reshape(out_shape), lse.reshape(lse_shape)

    def _guarded(self, call, args, mod_args):
        if self.pin is None:
            with kernel_call_guard():
                call(args, mod_args)
        else:
            with kernel_call_guard(), self.pin():
                call(args, mod_args)
