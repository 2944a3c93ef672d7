"""The complex-step derivative of a ``score_mod`` as a CUDA device function (the ``cuda`` backward's
``score_grad`` when the mod declares none): ``Im score_mod(score + 2**-100 i, ...) * 2**100`` in
complex64, so float32 arithmetic (the CPU's template, ``engine.kernels.score_grad``, is complex128,
which would be float64 on the GPU)."""

from __future__ import annotations

import threading

import numpy as np
from numba import cuda, float32  # this module is imported only when the cuda backend runs

from .flash_fwd import device_function, python_function

__all__ = ["complex_step_device_grad", "_no_score_grad"]


#: the imaginary step of the device complex-step derivative (complex64, so float32 arithmetic):
#: 2**-100 is a normal float32, and dividing by it (multiplying by 2**100) is exact
_STEP_J = np.complex64(2.0**-100 * 1j)
_INV_STEP32 = np.float32(2.0**100)


def _no_score_grad(score, b, h, q_idx, kv_idx):
    return float32(1.0)


_grad_lock = threading.Lock()
_complex_grads: dict = {}


def complex_step_device_grad(score_mod):
    """The complex-step derivative of ``score_mod`` (``engine.kernels.score_grad``) as a CUDA
    device function, in complex64: ``Im score_mod(score + 2**-100 i, ...) * 2**100`` in float32
    (the CPU's template is complex128, which would be float64 arithmetic on the GPU)."""
    fn = python_function(score_mod)
    with _grad_lock:
        dev = _complex_grads.get(fn)
        if dev is None:
            mod = device_function(fn)

            def _complex_step_grad(score, b, h, q_idx, kv_idx, *mod_args):
                return mod(score + _STEP_J, b, h, q_idx, kv_idx, *mod_args).imag * _INV_STEP32

            dev = _complex_grads[fn] = cuda.jit(device=True)(_complex_step_grad)
        return dev
