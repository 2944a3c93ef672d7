"""The derivative of a ``score_mod`` with respect to the score, by complex-step differentiation.

For a mod that is analytic in the score (sums, products, quotients, exp, tanh... of it),
``f(x + i*h) = f(x) + i*h*f'(x) + O(h^2)``, so ``Im f(x + i*h) / h`` is ``f'(x)`` to machine
precision with no cancellation, whatever ``h`` (Squire and Trapp, "Using complex variables to
estimate derivatives of real functions", SIAM Review 40, 1998). Numba compiles complex arithmetic,
so the user's mod runs unchanged on a complex score. Mods that compare or take ``abs`` of the
score are not analytic: they fail to compile on complex numbers or give a wrong derivative, which
``engine.problems.mods.score_mod_grad`` detects (finite differences) before any kernel runs.
"""

import numpy as np

from .identity_mods import no_score_mod

__all__ = ["complex_step_grad", "complex_step_grad_python", "STEP"]

#: the imaginary step: a power of two, so dividing by it is exact; tiny, so O(h^2) terms vanish
STEP = 2.0**-100
_INV_STEP = 2.0**100

#: the mod differentiated; ``engine.problems.mods.score_mod_grad`` compiles a copy with it re-bound
_SCORE_MOD = no_score_mod


def complex_step_grad(score, b, h, q_idx, kv_idx, *mod_args):
    """d score_mod(score, ...) / d score, in float64 (the template compiled per mod)."""
    return _SCORE_MOD(complex(score, STEP), b, h, q_idx, kv_idx, *mod_args).imag * _INV_STEP


def complex_step_grad_python(score_mod):
    """The same derivative evaluated by Python on the mod's Python function (the oracle's)."""
    fn = getattr(score_mod, "py_func", score_mod)

    def grad(score, b, h, q_idx, kv_idx, *mod_args):
        return float(np.imag(fn(complex(score, STEP), b, h, q_idx, kv_idx, *mod_args))) * _INV_STEP

    return grad
