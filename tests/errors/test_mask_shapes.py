"""A mask one too long or one too short on any axis is refused by validation, naming
``attn_mask`` (or ``key_padding_mask``) and the shapes, before any backend runs: on every
registered backend, for the functional API and for the variants."""

import numpy as np
import pytest

import engine

SCORES = (3, 4, 5, 7)  # (batch, heads, L, S): no axis of 1 or 2, so a size - 1 never broadcasts
#: validation runs before a backend is chosen, so each case tries every backend in one test
BACKENDS = ["auto", *engine.list_backends()]


def _off_by_one():
    """(mask shape, axis changed, delta): every axis one longer and one shorter, full-rank and as
    the trailing dims of a shorter mask."""
    cases = []
    for rank in (2, 3, 4):
        target = SCORES[-rank:]
        for axis in range(rank):
            for delta in (+1, -1):
                shape = list(target)
                shape[axis] += delta
                cases.append(tuple(shape))
    return cases


@pytest.fixture
def no_backend_runs(monkeypatch):
    """Any backend op's run() fails the test: validation must refuse first."""

    def refuse(self, problem):
        raise AssertionError(f"backend {self.backend.name!r} ran on an invalid problem")

    for backend in engine.backends.registry.backend_registry().values():
        for op in backend.ops:
            monkeypatch.setattr(op, "run", refuse)


@pytest.mark.parametrize("mshape", _off_by_one(), ids=str)
@pytest.mark.parametrize("dtype", [bool, np.float32])
def test_functional_mask_off_by_one_is_refused_by_validation(mshape, dtype, no_backend_runs):
    B, H, L, S = SCORES
    q = np.zeros((B, H, L, 8), np.float32)
    kv = np.zeros((B, H, S, 8), np.float32)
    mask = np.ones(mshape, dtype)
    for backend in BACKENDS:
        with pytest.raises(ValueError) as exc:
            engine.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, backend=backend)
        assert str(exc.value) == (
            f"attn_mask of shape {mshape} is not broadcastable to the score shape {SCORES} (batch..., heads, L, S)"
        ), backend


@pytest.mark.parametrize(
    "which,shape",
    [
        ("attn_mask", (5 + 1, 7)),
        ("attn_mask", (5 - 1, 7)),
        ("attn_mask", (5, 7 + 1)),
        ("attn_mask", (5, 7 - 1)),
        ("attn_mask", (3 * 2 + 1, 5, 7)),
        ("attn_mask", (3 * 2 - 1, 5, 7)),
        ("attn_mask", (6, 5 + 1, 7)),
        ("attn_mask", (6, 5, 7 - 1)),
        ("key_padding_mask", (3 + 1, 7)),
        ("key_padding_mask", (3 - 1, 7)),
        ("key_padding_mask", (3, 7 + 1)),
        ("key_padding_mask", (3, 7 - 1)),
    ],
)
def test_variant_mask_off_by_one_is_refused_by_validation(which, shape, no_backend_runs):
    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    x = np.zeros((3, 5, 8), np.float32)
    y = np.zeros((3, 7, 8), np.float32)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=rf"^{which} must have shape"):
            mh(x, y, y, backend=backend, **{which: np.zeros(shape, bool)})
