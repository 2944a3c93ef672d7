"""Kernels with mods share one driver per argument types and call their own task through its
address (``engine.kernels.task_pointer``): each tuple of mods gets its own result, the driver is
compiled once for all of them, and what a mod raises reaches the caller as before."""

import numpy as np

import engine
from engine.kernels.cpu import flash_bwd, flash_fwd
from engine.kernels.task_pointer import TaskKernel

from conftest import randn
from testmods import causal_mod, linear_bias, skip_every_third_key


def test_mods_of_the_same_argument_types_share_one_driver_and_keep_their_own_tasks(rng):
    q, k, v = randn(rng, (1, 2, 6, 8)), randn(rng, (1, 2, 11, 8)), randn(rng, (1, 2, 11, 8))
    cases = [
        (dict(score_mod=linear_bias), dict(score_mod=linear_bias)),
        (dict(mask_mod=skip_every_third_key), dict(attn_mask=np.arange(11) % 3 != 1)),
        (dict(mask_mod=causal_mod), dict(is_causal=True)),
        (dict(score_mod=linear_bias, mask_mod=causal_mod), dict(score_mod=linear_bias, is_causal=True)),
    ]
    for mods, same in cases:
        for backend_kernels, grad in ((flash_fwd, False), (flash_bwd, True)):
            out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cpu", return_lse=True, **mods)
            want, want_lse = engine.scaled_dot_product_attention(q, k, v, backend="reference", return_lse=True, **same)
            np.testing.assert_allclose(out, want, atol=2e-6, err_msg=str(mods))
            if grad:
                do = randn(rng, out.shape)
                got = engine.scaled_dot_product_attention_backward(do, q, k, v, out, lse, backend="cpu", **mods)
                ref = engine.scaled_dot_product_attention_backward(
                    do, q, k, v, want, want_lse, backend="reference", **same
                )
                for g, r in zip(got, ref):
                    np.testing.assert_allclose(g, r, atol=2e-5, err_msg=str(mods))
    for module in (flash_fwd, flash_bwd):
        built = {key: k for key, k in module._with_mods.items() if isinstance(k, TaskKernel)}
        assert len(built) >= len(cases), module.__name__
        # every kernel with mods runs one of at most two drivers (parallel, serial), each with one
        # overload per argument types: four tuples of mods compiled no driver of their own
        assert len({id(k.via) for k in built.values()}) <= 2
        # one task per tuple of mods (its serial and parallel kernels share it), each its own
        tasks: dict = {}
        for key, k in built.items():
            tasks.setdefault(key[:-1], set()).add(k.task)
        assert all(len(t) == 1 for t in tasks.values())
        assert len(set().union(*tasks.values())) == len(tasks)


def test_an_exception_a_mods_task_raises_reaches_the_caller(rng):
    from testmods import raising_mod

    q = randn(rng, (1, 1, 8, 4))
    try:
        engine.scaled_dot_product_attention(q, q, q, backend="cpu", score_mod=raising_mod)
    except ValueError as e:
        assert "raised by the mod" in str(e)
    else:
        raise AssertionError("the mod's exception was lost")
