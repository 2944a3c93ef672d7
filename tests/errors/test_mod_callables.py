"""Mods that Numba cannot compile as written get a TypeError naming the mod and what to do, before
any kernel: a default argument (it failed with Numba's "Signature mismatch: 4 argument types given,
but function takes 5 arguments") and callables that are not functions (functools.partial, bound
methods and callable objects failed with "The decorated object is not a function")."""

import functools

import numpy as np
import pytest

import engine

Q = np.ones((1, 1, 4, 8), np.float32)


class _Window:
    def __call__(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def mask(self, b, h, q_idx, kv_idx):
        return q_idx >= kv_idx


@pytest.mark.parametrize(
    "mod, words",
    [
        (lambda b, h, q_idx, kv_idx, w=3: q_idx - kv_idx < w, r"has default arguments \(w\)"),
        (
            functools.partial(lambda w, b, h, q_idx, kv_idx: q_idx - kv_idx < w, 3),
            "must be a plain Python function.*got partial",
        ),
        (_Window(), "must be a plain Python function.*got _Window"),
        (_Window().mask, "must be a plain Python function.*got method"),
    ],
)
def test_mods_numba_cannot_compile_as_written_are_refused_by_name(mod, words):
    with pytest.raises(TypeError, match=f"mask_mod .*{words}"):
        engine.scaled_dot_product_attention(Q, Q, Q, mask_mod=mod)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_mod_args_are_refused_by_name(dtype):
    """A float16/bfloat16 table among mod_args (was NotImplementedError: float16, or Numba's
    "Unsupported array dtype: bfloat16")."""
    import ml_dtypes

    table = np.zeros(1, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    with pytest.raises(TypeError, match=rf"mod_args\[0\] is a {dtype} array .*float32 or float64"):
        engine.scaled_dot_product_attention(Q, Q, Q, score_mod=lambda s, b, h, i, j, t: s + t[h], mod_args=(table,))


def _score_returns_tuple(score, b, h, q_idx, kv_idx):
    return score, score


def _score_returns_complex(score, b, h, q_idx, kv_idx):
    return complex(score, 1.0)


def _mask_returns_array(b, h, q_idx, kv_idx, table):
    return table[h:]


def _score_returns_none_sometimes(score, b, h, q_idx, kv_idx):
    if q_idx > 3:
        return score
    return None


@pytest.mark.parametrize(
    "mods, returned",
    [
        (dict(score_mod=_score_returns_tuple), "UniTuple"),
        (dict(score_mod=_score_returns_complex), "complex"),
        (dict(score_mod=_score_returns_none_sometimes), "OptionalType"),
        (dict(mask_mod=_mask_returns_array, mod_args=(np.ones(2, bool),)), "array"),
    ],
)
def test_a_mod_returning_what_a_kernel_cannot_store_is_named(mods, returned):
    """The cpu backend names the mod and what it returns (before: Numba's typing error at the
    kernel's line that stores the score)."""
    q = np.random.default_rng(0).random((1, 2, 8, 4)).astype(np.float32)
    name = next(v for k, v in mods.items() if k.endswith("_mod")).__qualname__
    with pytest.raises(TypeError, match=rf"(score|mask)_mod {name} returns .*{returned}.*on every path"):
        engine.scaled_dot_product_attention(q, q, q, backend="cpu", **mods)
