"""The mods a kernel calls when the caller gave none: the identity ``score_mod`` and the allow-all
``mask_mod`` (shared by the cpu kernels and the score_mod derivative), and the identity's derivative."""

from numba import njit

from ..runtime.jit_cache import cache_enabled

__all__ = ["no_score_mod", "no_mask_mod", "no_score_grad"]

_CACHE = cache_enabled()


@njit(cache=_CACHE)
def no_score_mod(score, b, h, q_idx, kv_idx, *mod_args):
    """The identity ``score_mod`` passed when the caller gave none."""
    return score


@njit(cache=_CACHE)
def no_mask_mod(b, h, q_idx, kv_idx, *mod_args):
    """The allow-all ``mask_mod`` passed when the caller gave none."""
    return True


@njit(cache=_CACHE)
def no_score_grad(score, b, h, q_idx, kv_idx, *mod_args):
    """The derivative of the identity ``score_mod``: 1."""
    return 1.0
