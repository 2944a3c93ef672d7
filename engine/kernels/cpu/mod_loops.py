"""The ``cpu`` kernels' mod loops: the mods run over a tile or a row of scores, built per tuple of mods
and called by address from the tasks (``engine.kernels.mod_calls``). Each is written over the
globals ``_SCORE_MOD``, ``_MASK_MOD``, ``_SCORE_GRAD`` and ``_ARG_GRAD`` (bound per tuple of mods)
and ``_USER_ARGS`` (bound with them per type of the caller's ``mod_args``): ``mod_args`` is the
task's, the loops' addresses and tags and then the caller's ``mod_args`` (or their packed address),
which ``_USER_ARGS(mod_args)`` gives back. Plain functions: only their bound copies are compiled.
Two layouts of a tile occur: the forward and backward flash tasks keep it transposed, ``st[c, r]``
for key ``k0 + c`` and query ``q0 + r``; the decode and varlen row tasks a row per query, ``row[c]``
for key ``k0 + c``.
"""

import numpy as np

from ..identity_mods import no_mask_mod, no_score_grad, no_score_mod
from ..mod_arg_grad import no_arg_grad

_SCORE_MOD = no_score_mod
_SCORE_GRAD = no_score_grad
_MASK_MOD = no_mask_mod
_ARG_GRAD = no_arg_grad
_USER_ARGS = None  # bound with the mods: mod_args -> the user's (engine.kernels.mod_calls.user_args)


def score_tile(st, b, h, q0, k0, mod_args):
    """``st[c, r] = score_mod(st[c, r], b, h, q0 + r, k0 + c, *mods)`` (transposed tile)."""
    user = _USER_ARGS(mod_args)
    for c in range(st.shape[0]):
        for r in range(st.shape[1]):
            st[c, r] = _SCORE_MOD(st[c, r], b, h, q0 + r, k0 + c, *user)


def mask_tile(st, b, h, q0, k0, mod_args):
    """``st[c, r] = -inf`` where ``mask_mod(b, h, q0 + r, k0 + c, *mods)`` is False (transposed tile)."""
    user = _USER_ARGS(mod_args)
    neg_inf = st.dtype.type(-np.inf)
    for c in range(st.shape[0]):
        for r in range(st.shape[1]):
            if not _MASK_MOD(b, h, q0 + r, k0 + c, *user):
                st[c, r] = neg_inf


def mask_queries(col, b, h, q0, k, r0, r1, mod_args):
    """``col[r] = -inf`` for ``r0 <= r < r1`` where ``mask_mod(b, h, q0 + r, k, *mods)`` is False:
    one key's scores over the queries of a transposed tile."""
    user = _USER_ARGS(mod_args)
    neg_inf = col.dtype.type(-np.inf)
    for r in range(r0, r1):
        if not _MASK_MOD(b, h, q0 + r, k, *user):
            col[r] = neg_inf


def score_keys(row, b, h, q, k0, mod_args):
    """``row[c] = score_mod(row[c], b, h, q, k0 + c, *mods)``: one query's scores over keys."""
    user = _USER_ARGS(mod_args)
    for c in range(row.shape[0]):
        row[c] = _SCORE_MOD(row[c], b, h, q, k0 + c, *user)


def mask_keys(row, b, h, q, k0, c0, c1, mod_args):
    """``row[c] = -inf`` for ``c0 <= c < c1`` where ``mask_mod(b, h, q, k0 + c, *mods)`` is False:
    one query's scores over keys."""
    user = _USER_ARGS(mod_args)
    neg_inf = row.dtype.type(-np.inf)
    for c in range(c0, c1):
        if not _MASK_MOD(b, h, q, k0 + c, *user):
            row[c] = neg_inf


def score_grad_tile(pt, gt, rt, keep_raw, b, h, q0, k0, mod_args):
    """The backward's scores through the ``score_mod`` (transposed tile): ``gt`` gets its
    derivative at each score, ``pt`` the modified score, and ``rt`` (when ``keep_raw``) the score
    before it, the ``mod_args`` gradients' operand."""
    user = _USER_ARGS(mod_args)
    for c in range(pt.shape[0]):
        for r in range(pt.shape[1]):
            x = pt[c, r]
            if keep_raw:
                rt[c, r] = x
            gt[c, r] = _SCORE_GRAD(x, b, h, q0 + r, k0 + c, *user)
            pt[c, r] = _SCORE_MOD(x, b, h, q0 + r, k0 + c, *user)


def score_grad_keys(row, grow, b, h, q, k0, mod_args):
    """One query's scores over keys through the ``score_mod``: ``grow`` gets its derivative."""
    user = _USER_ARGS(mod_args)
    for c in range(row.shape[0]):
        x = row[c]
        grow[c] = _SCORE_GRAD(x, b, h, q, k0 + c, *user)
        row[c] = _SCORE_MOD(x, b, h, q, k0 + c, *user)


def arg_grad_tile(dst, rt, b, h, q0, k0, mod_args, acc, reads, offsets, most):
    """The ``mod_args`` gradients of a transposed tile: each score with ``dS != 0`` adds dS times
    the ``score_mod``'s partials into ``acc`` (``engine.kernels.mod_arg_grad``); ``most[0]`` gets
    the most marked elements one score read, if more than it holds."""
    user = _USER_ARGS(mod_args)
    zero = dst.dtype.type(0.0)
    for c in range(dst.shape[0]):
        for r in range(dst.shape[1]):
            if dst[c, r] != zero:
                n = _ARG_GRAD(np.float64(dst[c, r]), rt[c, r], b, h, q0 + r, k0 + c, user, acc, reads, offsets)
                if n > most[0]:
                    most[0] = n
