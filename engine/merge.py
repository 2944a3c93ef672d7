"""``merge_attention``: combine attention results computed over disjoint key sets, exactly."""

from __future__ import annotations

import numpy as np

from .problems.arrays import array_dtype, is_device_array, is_floating
from .problems.arrays import as_array as _as_array

__all__ = ["merge_attention"]


def merge_attention(outs, lses):
    """Merge partial attention results over disjoint sets of keys into the result over their union.

    ``outs[p]`` and ``lses[p]`` are what ``scaled_dot_product_attention(..., return_lse=True)``
    returns for the same queries over the p-th set of keys: ``out`` of shape ``(..., L, Ev)`` and
    the natural-log log-sum-exp of the scaled, masked scores ``(..., L)``. The merge is exact (up
    to rounding)::

        lse = log(sum_p exp(lse_p)),    out = sum_p exp(lse_p - lse) * out_p

    (shifted by the largest ``lse_p``): the combine step of split-KV decoding (FlashAttention's
    ``num_splits``; Dao et al., "Flash-Decoding for long-context inference", 2023).

    Empty parts (a row with no visible key in that part: ``lse_p = -inf``, ``out_p`` ignored) are
    handled; a row empty in every part gives zeros and ``lse = -inf``, never NaN. A NaN or ``+inf``
    ``lse_p`` makes its row NaN (as a NaN or infinite score does in a single call); a NaN or inf in
    ``out_p`` reaches exactly the rows whose weight for that part is > 0.

    :param outs: a list or tuple of P >= 1 arrays of one shape ``(..., Ev)`` (NumPy arrays, torch
        CPU tensors; float16, bfloat16, float32 or float64, one dtype), or one array whose first
        axis holds the P parts.
    :type outs: sequence of arrays | array
    :param lses: the same for the log-sum-exps, each of shape ``outs[p].shape[:-1]``.
    :type lses: sequence of arrays | array
    :return: ``(out, lse)``: out in the dtype of ``outs``, lse in the dtype of ``lses``; computed in
        float64 if either is float64, else in float32.
    :raises TypeError: a non-floating dtype, mixed dtypes within ``outs`` or ``lses``, device
        arrays, or ``outs``/``lses`` not a sequence of arrays.
    :raises ValueError: no parts, different numbers of parts, or shapes that do not match.
    """
    out_parts = _parts(outs, "outs")
    lse_parts = _parts(lses, "lses")
    if len(out_parts) != len(lse_parts):
        raise ValueError(f"outs and lses must hold the same number of parts, got {len(out_parts)} and {len(lse_parts)}")
    out_dtype = _one_dtype(out_parts, "outs")
    lse_dtype = _one_dtype(lse_parts, "lses")
    shape = tuple(out_parts[0].shape)
    if len(shape) < 1:
        raise ValueError(f"outs[0] must have at least 1 dimension (..., Ev), got shape {shape}")
    for name, parts, want in (("outs", out_parts, shape), ("lses", lse_parts, shape[:-1])):
        for p, a in enumerate(parts):
            if tuple(a.shape) != want:
                raise ValueError(
                    f"{name}[{p}] has shape {tuple(a.shape)}, expected {want} (outs[0] has "
                    f"shape {shape}; lses[p] must have shape outs[p].shape[:-1])"
                )
    compute = np.float64 if np.float64 in (out_dtype, lse_dtype) else np.float32
    P, Ev = len(out_parts), shape[-1]
    N = int(np.prod(shape[:-1], dtype=np.int64))
    part_out = np.empty((P, N, Ev), compute)
    part_lse = np.empty((P, N), compute)
    for p in range(P):
        part_out[p] = np.reshape(out_parts[p], (N, Ev))
        part_lse[p] = np.reshape(lse_parts[p], (N,))
    out = np.empty((N, Ev), compute)
    lse = np.empty(N, compute)
    if N and Ev:
        merge_rows(part_out, part_lse, out, lse)
    elif N:  # Ev = 0: only the log-sum-exp carries information
        merge_rows(np.zeros((P, N, 1), compute), part_lse, np.empty((N, 1), compute), lse)
    return out.reshape(shape).astype(out_dtype, copy=False), lse.reshape(shape[:-1]).astype(lse_dtype, copy=False)


def merge_rows(part_out: np.ndarray, part_lse: np.ndarray, out: np.ndarray, lse: np.ndarray) -> None:
    """Run the merge kernel on laid-out arrays: ``part_out`` (P, N, Ev), ``part_lse`` (P, N) into
    ``out`` (N, Ev), ``lse`` (N,); one dtype, float32 or float64, C order (no validation)."""
    from .kernels.lse_merge import _merge_rows
    from .runtime.threads import kernel_call_guard

    with kernel_call_guard():
        _merge_rows(part_out, part_lse, out, lse)


def _parts(x, name: str) -> list:
    if isinstance(x, (list, tuple)):
        parts = [_as_array(a, f"{name}[{p}]") for p, a in enumerate(x)]
    elif x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(
            f"{name} must be a list or tuple of arrays, or one array with the parts on "
            f"its first axis, got {type(x).__name__}"
        )
    else:
        arr = _as_array(x, name)
        if arr.ndim < 1:
            raise ValueError(f"{name} as one array must have the parts on its first axis, got shape {tuple(arr.shape)}")
        parts = list(arr)
    if not parts:
        raise ValueError(f"{name} must hold at least one part, got none")
    for p, a in enumerate(parts):
        if is_device_array(a):
            raise TypeError(
                f"merge_attention takes host arrays (NumPy, torch CPU tensors); {name}[{p}] is a device array"
            )
    return parts


def _one_dtype(parts: list, name: str) -> np.dtype:
    dtypes = {np.dtype(array_dtype(a)) for a in parts}
    for p, a in enumerate(parts):
        if not is_floating(array_dtype(a)):
            raise TypeError(
                f"{name}[{p}] must have a floating dtype (float16, float32, float64, "
                f"bfloat16), got {array_dtype(a)} with shape {tuple(a.shape)}"
            )
    if len(dtypes) != 1:
        raise TypeError(f"every part of {name} must have one dtype, got {sorted(str(d) for d in dtypes)}")
    return dtypes.pop()
