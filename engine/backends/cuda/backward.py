"""The host side of the ``cuda`` backend's backward pass (and the dropout arguments its forward
shares): array layouts, scratch buffers, the three kernel launches of
``engine.kernels.cuda.flash_bwd`` and the reduction of the float mask's gradient.

Arrays are handled as by the forward (``engine.backends.cuda``): NumPy inputs are copied to the
GPU and the gradients copied back as NumPy arrays; device inputs (torch CUDA tensors, CuPy arrays,
Numba device arrays) are read in place whatever their strides, the gradients are allocated by the
inputs' library, and everything runs on the caller's stream without synchronising. Importing this
module never needs CUDA.
"""

from __future__ import annotations

import math

import numpy as np

from ...kernels.kinds import MASK_FLOAT, TILE_FULL
from ...problems.arrays import is_bfloat16
from ...problems.attention import AttentionProblem, BackwardProblem
from ...problems.masks import reduce_to_shape
from ...runtime.config import CUDA_TILE_SHARED_BYTES
from ..base import Op
from .forward import DTYPES

__all__ = ["CudaBackward", "backward_tile_sizes", "backward_not_supported_reasons", "run_cuda_backward"]


class CudaBackward(Op):
    """FlashAttention-2's backward (Dao 2023, Algorithm 2) as three deterministic kernels
    (``engine.kernels.cuda.flash_bwd``): dq/dk/dv in the shapes and dtype of query/key/value,
    dmask in the float mask's shape and dtype or None; arrays of the inputs' kind.

    :raises engine.NotSupportedError: from ``run``, a score_mod without a declared derivative
        whose complex-step form numba-cuda cannot compile."""

    problem_type = BackwardProblem
    dtypes = DTYPES
    device_arrays = True
    supports_mods = True
    supports_dropout = True
    #: its weights are exp(score - lse) from the given lse, which holds the sinks (engine.problems.sinks);
    #: checked under the CUDA simulator (tests/cuda/test_cuda_sinks.py), not yet on a GPU
    supports_sinks = True

    def not_supported_reasons(self, problem) -> list[str]:
        reasons = super().not_supported_reasons(problem)
        gpu = not reasons and self.backend.unavailable_reason() is None
        return reasons + backward_not_supported_reasons(problem, gpu=gpu)

    def run(self, problem: BackwardProblem):
        return run_cuda_backward(self.backend, problem)


def backward_tile_sizes(E: int, Ev: int) -> tuple[int, int]:
    """(block_q, block_k) of the backward kernels: square tiles of up to 64 rows, as long as a
    staged tile of Q and dO (or of K and V) fits 32 KiB of shared memory, a multiple of 8."""
    width = max(E, 1) + max(Ev, 1)
    t = max(8, min(64, CUDA_TILE_SHARED_BYTES // (4 * width) // 8 * 8))
    return t, t


def backward_not_supported_reasons(problem: AttentionProblem, gpu: bool = False) -> list[str]:
    """What the ``cuda`` backward refuses beyond its dtypes and flags (float64 and the
    bottom-right causal offset are refused through those). ``gpu``: a GPU is there (the caller found
    no other reason), so a score_mod's complex-step derivative is compiled once (memoised) to see
    whether numba-cuda can type it; never under the simulator, which has no compiler."""
    from numba import config

    reasons = []
    if gpu and not config.ENABLE_CUDASIM and problem.score_mod is not None and _declared_grad(problem) is None:
        from numba import cuda

        why = complex_step_compile_error(
            problem.score_mod, problem.mod_args, cuda.get_current_device().compute_capability
        )
        if why:
            reasons.append(why)
    if problem.E == 0:
        reasons.append("E = 0 has no backward pass in this backend")
    if problem.on_device:
        B, Hq, H, L, S = problem.batch, problem.num_q_heads, problem.num_kv_heads, problem.L, problem.S
        full = {"query": B * Hq * L * problem.E, "key": B * H * S * problem.E, "value": B * H * S * problem.Ev}
        for name, arr in (("query", problem.query), ("key", problem.key), ("value", problem.value)):
            if math.prod(arr.shape) != full[name]:
                reasons.append(
                    f"device {name} of shape {tuple(arr.shape)} broadcasts over batch or heads, and its "
                    "gradient would need a reduction this backend does not do: pass it expanded "
                    "(e.g. torch's .expand(), read in place)"
                )
    return reasons


_probe_results: dict = {}


def complex_step_compile_error(score_mod, mod_args, cc) -> str | None:
    """Why the complex-step derivative of ``score_mod`` (in complex64, see
    ``engine.kernels.cuda.flash_bwd.complex_step_device_grad``) does not compile for the GPU of
    compute capability ``cc`` with these ``mod_args``, or None when it does. One ``compile_ptx`` of a
    probe kernel per mod and argument types, memoised (the CPU's check cannot tell: NumPy ufuncs on
    complex numbers, for one, compile on the CPU and not on the GPU)."""
    from numba import cuda, float32, typeof, types

    from ...kernels.cuda.flash_bwd import complex_step_device_grad
    from ...kernels.cuda.flash_fwd import python_function

    def arg_type(a):
        if hasattr(a, "__cuda_array_interface__"):
            return typeof(cuda.as_cuda_array(a, sync=False))
        return typeof(a)

    argtypes = types.Tuple(tuple(arg_type(a) for a in mod_args))
    key = (python_function(score_mod), argtypes, tuple(cc))
    if key not in _probe_results:
        grad = complex_step_device_grad(score_mod)

        def _probe(out, b, h, i, j, mod_args):
            out[0] = float32(grad(out[0], b, h, i, j, *mod_args))

        sig = (types.float32[::1], types.int64, types.int64, types.int64, types.int64, argtypes)
        why = None
        try:
            cuda.compile_ptx(_probe, sig, cc=tuple(cc))
        except Exception as exc:  # a typing or lowering error of numba-cuda: say which
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            name = getattr(python_function(score_mod), "__qualname__", repr(score_mod))
            why = (
                f"score_mod {name} declares no derivative and its complex-step derivative does not "
                f"compile on the GPU ({type(exc).__name__}: {first[:200]}); declare it with "
                "engine.problems.mods.with_score_grad"
            )
        _probe_results[key] = why
    return _probe_results[key]


def _declared_grad(problem):
    """The score_mod's declared derivative (its Python function) or None for complex step."""
    from ...kernels.cuda.flash_fwd import python_function

    mod = problem.score_mod
    declared = getattr(mod, "score_grad", None) or getattr(python_function(mod), "score_grad", None)
    return declared


def run_cuda_backward(backend, problem: AttentionProblem):
    """``(dq, dk, dv, dmask)`` of a validated backward problem on the GPU (see
    ``Backend.run_backward``); ``backend`` gives the tile sizes (``block_q``/``block_k``).

    dq, dk, dv: the shapes and dtype (float32, float16 or bfloat16) of query, key and value;
    dmask: the float mask's shape and dtype when ``problem.return_mask_grad``, else None. NumPy
    arrays for host inputs; for device inputs, arrays of the inputs' library on their device,
    ordered on the caller's stream (no synchronisation), except the mask gradient of Numba device
    arrays, reduced on the host (synchronises).

    :raises engine.NotSupportedError: the score_mod declares no derivative and its complex-step
        form does not compile on the GPU (a typing error of numba-cuda).
    """
    from numba import cuda

    from .operands import DeviceArrays, HostArrays

    arrays = DeviceArrays(cuda, problem.query) if problem.on_device else HostArrays(cuda)
    with arrays.context():
        return _run(backend, problem, cuda, arrays)


def _zeros(arrays, cuda, shape, dtype):
    """Zeros of ``dtype`` in the arrays' kind (host path: NumPy)."""
    z = np.zeros(shape, dtype=dtype)
    if not getattr(arrays, "kind", None):
        return z
    if arrays.kind == "torch":
        from .operands import torch_dtype

        return arrays.lib.zeros(shape, dtype=torch_dtype(arrays.lib, dtype), device=arrays.device)
    if arrays.kind == "cupy":
        return arrays.lib.zeros(shape, dtype=dtype)
    if is_bfloat16(np.dtype(dtype)):
        z = z.view(np.uint16)
    return cuda.to_device(z, stream=arrays.stream)


def _empty_gradients(problem, arrays, cuda):
    grads = tuple(_zeros(arrays, cuda, a.shape, problem.dtype) for a in (problem.query, problem.key, problem.value))
    dmask = None
    if problem.return_mask_grad:
        dmask = _zeros(arrays, cuda, tuple(problem.attn_mask.shape), _mask_dtype(problem.attn_mask))
    return grads + (dmask,)


def _mask_dtype(mask):
    dt = getattr(mask, "dtype", None)
    if type(mask).__module__.split(".")[0] == "torch":
        from ...problems.arrays import bfloat16_dtype

        name = str(dt).removeprefix("torch.")
        return bfloat16_dtype() if name == "bfloat16" else np.dtype(name)
    return np.dtype(dt)


def _run(backend, problem, cuda, arrays):
    from ...kernels.cuda.flash_bwd import backward_kernels
    from .operands import cuda_dropout_args, qkv_mask_operands, tile_kinds

    B, Hq, H, L, S, E, Ev = (
        problem.batch,
        problem.num_q_heads,
        problem.num_kv_heads,
        problem.L,
        problem.S,
        problem.E,
        problem.Ev,
    )
    if 0 in (B, Hq, L, S, Ev):
        return _empty_gradients(problem, arrays, cuda)
    bq, bk = backward_tile_sizes(E, Ev)
    bq = backend.block_q or bq
    bk = backend.block_k or bk
    rank = len(problem.batch_shape) + 3
    ops, kind = qkv_mask_operands(problem, cuda, arrays)
    ops.append(arrays.flat(problem.out, problem, rank))
    ops.append(arrays.flat(problem.grad_out, problem, rank))
    # host lse: float32 (exact from 16-bit, the kernels' precision from float64); device: in place
    ops.append(arrays.flat(problem.lse, problem, rank - 1, cast=None if problem.on_device else np.float32))
    meta = np.zeros((3 + B, 7), dtype=np.int64)
    for col, (_, offs, st) in enumerate(ops):
        meta[: len(st), col] = st
        meta[3:, col] = offs
    d_meta = cuda.to_device(meta, stream=arrays.stream)
    mod_args = tuple(arrays.mod_arg(a) for a in problem.mod_args)
    kinds = np.full((1, 1, 1, 1), TILE_FULL, dtype=np.int8)
    if problem.mask_mod is not None:
        kinds = np.ascontiguousarray(tile_kinds(problem, bq, bk))
    d_kinds = cuda.to_device(kinds, stream=arrays.stream)
    mask_bf16 = kind == MASK_FLOAT and ops[3][0].dtype == np.uint16
    lse_bf16 = ops[6][0].dtype == np.uint16
    want_dm = problem.return_mask_grad
    pre, dkdv, dqk = backward_kernels(
        E,
        Ev,
        bq,
        bk,
        kind,
        problem.is_causal,
        problem.score_mod,
        _declared_grad(problem) if problem.score_mod is not None else None,
        problem.mask_mod,
        bf16=is_bfloat16(problem.dtype),
        mask_bf16=mask_bf16,
        lse_bf16=lse_bf16,
        dropout=problem.dropout_p > 0,
        want_dm=want_dm,
    )
    f32 = np.dtype(np.float32)
    delta = arrays.as_numba(arrays.empty((B, Hq, L), f32))
    lrow = arrays.as_numba(arrays.empty((B, Hq, L), f32))
    dq = arrays.empty((B, Hq, L, E), problem.dtype)
    dk = arrays.empty((B, H, S, E), problem.dtype)
    dv = arrays.empty((B, H, S, Ev), problem.dtype)
    dm = (
        arrays.empty((B, Hq, L, S), f32)
        if want_dm
        else cuda.to_device(np.zeros((1, 1, 1, 1), f32), stream=arrays.stream)
    )
    drop = cuda_dropout_args(problem)
    stream = arrays.stream
    q, k, v, mask, o, do, lse = (op[0] for op in ops)
    try:
        pre[(math.ceil(L / bq), Hq, B), bq, stream](o, do, lse, d_meta, L, delta, lrow)
        common = (q, k, v, mask, do, d_meta, lrow, delta, L, S, problem.group, problem.scale, mod_args, d_kinds)
        dkdv[(math.ceil(S / bk), H, B), bk, stream](*common, arrays.as_numba(dk), arrays.as_numba(dv), *drop)
        dqk[(math.ceil(L / bq), Hq, B), bq, stream](*common, arrays.as_numba(dq), arrays.as_numba(dm), *drop)
    except Exception as exc:
        from numba.core.errors import TypingError

        if problem.score_mod is None or not isinstance(exc, TypingError):
            raise
        from ...runtime.errors import NotSupportedError

        raise NotSupportedError(
            "the cuda backend could not compile the score_mod's derivative on the GPU (its complex-step "
            "derivative evaluates the mod on complex64 scores; numba-cuda cannot type that for this mod): "
            "declare the derivative with engine.problems.mods.with_score_grad, or use backend='cpu'"
            f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            {"cuda": ["score_mod derivative does not compile on the GPU"]},
        ) from exc
    grads = _finish(arrays, problem, (dq, dk, dv))
    dmask = _mask_grad(arrays, problem, dm, cuda) if want_dm else None
    return grads + (dmask,)


def _finish(arrays, problem, grads):
    shapes = (problem.query.shape, problem.key.shape, problem.value.shape)
    if problem.on_device:
        return tuple(g.reshape(tuple(s)) for g, s in zip(grads, shapes))
    host = [g.copy_to_host(stream=arrays.stream) for g in grads]
    arrays.stream.synchronize()
    if is_bfloat16(problem.dtype):
        host = [h.view(problem.dtype) for h in host]
    return tuple(h.reshape(s) for h, s in zip(host, shapes))


def _mask_grad(arrays, problem, dm, cuda):
    """dS (B, Hq, L, S) summed to the mask's shape over the axes the mask broadcasts along, in
    the mask's dtype: NumPy (float64 sums) for host inputs and Numba device arrays, the inputs'
    library (float32 sums, deterministic) for torch and CuPy."""
    mshape = tuple(problem.attn_mask.shape)
    full = (problem.batch_shape + (problem.num_q_heads,) if problem.query.ndim > 2 else ()) + (problem.L, problem.S)
    if not problem.on_device or arrays.kind == "numba":
        host = dm.copy_to_host(stream=arrays.stream)
        arrays.stream.synchronize()
        out = reduce_to_shape(host.reshape(full), mshape).astype(_mask_dtype(problem.attn_mask))
        if not problem.on_device:
            return out
        if is_bfloat16(out.dtype):
            out = out.view(np.uint16)
        return cuda.to_device(out, stream=arrays.stream)
    t = dm.reshape(full)
    lead = t.ndim - len(mshape)
    torch = arrays.kind == "torch"

    def total(x, axes):
        return x.sum(dim=axes, keepdim=True) if torch else x.sum(axis=axes, keepdims=True)

    if lead:
        t = total(t, tuple(range(lead))).reshape(t.shape[lead:])
    axes = tuple(a for a, (n, m) in enumerate(zip(mshape, t.shape)) if n == 1 and m != 1)
    if axes:
        t = total(t, axes)
    t = t.reshape(mshape)
    return t.to(problem.attn_mask.dtype) if torch else t.astype(problem.attn_mask.dtype)
