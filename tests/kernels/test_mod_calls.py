"""The mods' loops are called by address with the argument types they were compiled for, or not at
all (``engine.kernels.mod_calls``): a loop whose tag does not match its call site is not called,
and the kernel raises a clear error instead of reading its arguments as other types."""

import numpy as np
import pytest
from numba import njit, types

import engine
from engine.kernels.cpu import flash_fwd
from engine.kernels.mod_calls import MOD_CALL_MISMATCH, ModLoop, mod_loop, types_tag

from conftest import randn


@njit
def _add_first(x, mod_args):
    x[0] += mod_args[2]


@njit
def _run_loop(x, mod_args):
    return mod_loop(0, mod_args, x, mod_args)


def test_a_loop_runs_only_with_its_own_tag():
    x = np.zeros(2)
    head_ty = types.UniTuple(types.int64, 2)
    argtys = (types.Array(types.float64, 1, "C"), types.Tuple((types.int64, types.int64, types.float64)))
    _add_first.compile(argtys)
    compiled = _add_first.overloads[argtys]
    address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
    tag = types_tag(argtys)
    assert tag != 0 and tag == types_tag(argtys)  # the same in every call (a checksum of names)
    assert _run_loop(x, (address, tag, 2.5)) and x[0] == 2.5
    assert not _run_loop(x, (address, tag + 1, 2.5)) and x[0] == 2.5  # another tag: not called
    assert _run_loop(x, (0, 0, 2.5)) and x[0] == 2.5  # no loop: nothing to run, and no error
    assert types_tag((head_ty,)) != types_tag(argtys)


def test_a_kernel_whose_loop_has_other_types_raises_instead_of_calling_it(rng, monkeypatch):
    # a score loop compiled for float64 tiles in a float32 kernel: its tag cannot match
    score, mask = flash_fwd._kernels.loops

    def wrong(args, mod_args):
        return (types.Array(types.float64, 2, "C"),) + tuple(score.types(args, mod_args))[1:]

    monkeypatch.setattr(flash_fwd._kernels, "loops", (ModLoop(score.fn, score.reads, wrong), mask))
    q = randn(rng, (1, 2, 8, 4))

    def new_mod(score, b, h, q_idx, kv_idx):  # a mod no kernel was built for yet
        return score * 0.5

    with pytest.raises(RuntimeError, match=MOD_CALL_MISMATCH[:30]):
        engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=new_mod)


def _mixed(score, b, h, q_idx, kv_idx, table, n, scale, flip, cap):
    s = score * scale + table[h] * (q_idx - kv_idx) / n
    return -s if flip else min(s, cap)


def test_a_new_mod_with_new_mod_args_types_compiles_no_task_and_no_driver(rng):
    """``mod_args`` of numbers, booleans and arrays reach the task packed behind an address: the
    float32 forward's one task and driver serve a mod whose ``mod_args`` have types no call had."""
    q = randn(rng, (1, 2, 16, 8))
    engine.scaled_dot_product_attention(q, q, q, backend="cpu")  # the kernel without mods
    kernel = flash_fwd.flash_kernel(None, None, serial=True)
    tasks, drivers = len(flash_fwd._flash_task.overloads), len(kernel.via.overloads)
    for flip in (True, False):  # both branches of the mod: the arguments arrive with their values
        args = (np.array([0.1, -0.2], np.float32), 3, 0.5, flip, np.float32(0.25))
        out = engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=_mixed, mod_args=args)
        want = engine.scaled_dot_product_attention(q, q, q, backend="reference", score_mod=_mixed, mod_args=args)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert len(flash_fwd._flash_task.overloads) == tasks and len(kernel.via.overloads) == drivers


def _by_mode(b, h, q_idx, kv_idx, mode):
    return kv_idx <= q_idx if mode == "causal" else True


def test_mod_args_that_cannot_be_packed_are_passed_as_they_are(rng):
    """A string among ``mod_args`` (a reference-counted object other than an array) is not packed:
    the task takes the entries after the loops' head, compiled for their types."""
    q = randn(rng, (1, 2, 16, 8))
    out = engine.scaled_dot_product_attention(q, q, q, backend="cpu", mask_mod=_by_mode, mod_args=("causal",))
    want = engine.scaled_dot_product_attention(q, q, q, backend="reference", is_causal=True)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def _gate(score, b, h, q_idx, kv_idx, a):
    return score * (a > 0)


def test_ints_past_int64_get_their_own_kernels_in_any_order(rng):
    """Numba types an int past int64 as uint64: such a call and later int64 ones each get their
    own kernel, whichever comes first (one memo once served both, and raised OverflowError)."""
    q = randn(rng, (1, 2, 16, 8))
    for a in (3, 2**63 + 5, -1, 2**64 - 1, 7):
        out = engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=_gate, mod_args=(a,))
        want = engine.scaled_dot_product_attention(q, q, q, backend="reference", score_mod=_gate, mod_args=(a,))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=str(a))
    with pytest.raises(ValueError, match=r"mod_args\[0\] = 18446744073709551616 does not fit in 64 bits"):
        engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=_gate, mod_args=(2**64,))


def test_mod_args_kinds_reach_the_kernels_as_given(rng):
    import torch

    from engine.problems.arrays import native_mod_args

    q = randn(rng, (1, 2, 16, 8))
    table = np.array([0.5, -0.25], np.float32)
    read_only = table.copy()
    read_only.flags.writeable = False
    assert native_mod_args((read_only,))[0] is read_only  # read (not copied) on every call
    for slopes in (read_only, np.broadcast_to(np.float32(0.3), (2,)), torch.tensor(table)):
        out = engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=_slope, mod_args=(slopes,))
        want = engine.scaled_dot_product_attention(q, q, q, backend="reference", score_mod=_slope, mod_args=(slopes,))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=type(slopes).__name__)
    with pytest.raises(TypeError, match=r"mod_args\[0\] is a float16 scalar"):
        engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=_gate, mod_args=(np.float16(1),))


def _slope(score, b, h, q_idx, kv_idx, slopes):
    return score + slopes[h] * (kv_idx - q_idx)
