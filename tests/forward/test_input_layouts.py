"""Arrays whose values are fine but whose memory layout is unusual: non-native byte order,
unaligned buffers, read-only arrays, for query/key/value, masks and ``mod_args``, on every backend.
Each gives the same result as a plain copy (converted in validation, never a Numba typing error)."""

import numpy as np
import pytest

import engine

from conftest import available_backends
from testmods import doc_alibi, doc_only, same_doc


def _big_endian(a):
    return a.astype(a.dtype.newbyteorder(">"))


def _unaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert a.itemsize == 1 or not u.flags.aligned
    return u


def _read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


LAYOUTS = {"big-endian": _big_endian, "unaligned": _unaligned, "read-only": _read_only}


# every operand, layout and dtype (the cpu backend compiles one read-only signature for any
# read-only operand: test_read_only_operands_share_one_compiled_signature)
CASES = [
    (dtype, layout, which)
    for dtype in (np.float32, np.float64)
    for layout in sorted(LAYOUTS)
    for which in ("query", "key", "value", "all", "bool_mask", "float_mask", "mod_args")
]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize(("dtype", "layout", "which"), CASES, ids=[f"{w}-{la}-{d.__name__}" for d, la, w in CASES])
def test_unusual_layouts_give_the_plain_result(backend, dtype, layout, which):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, 17, 8)).astype(dtype) for _ in range(3))
    kw = {}
    if which == "bool_mask":
        kw["attn_mask"] = rng.random((17, 17)) > 0.3
    elif which == "float_mask":
        kw["attn_mask"] = rng.standard_normal((3, 17, 17)).astype(dtype)
    elif which == "mod_args":
        if backend not in ("cpu", "reference"):
            pytest.skip("mods run on the cpu and reference backends only")  # cuda is GPU-only here
        kw = {
            "score_mod": doc_alibi,
            "mask_mod": same_doc,
            "mod_args": (np.linspace(0.1, 0.4, 3).astype(dtype), np.arange(17) // 5),
        }
    expected = engine.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    f = LAYOUTS[layout]
    args = [f(a) if which in (name, "all") else a for a, name in ((q, "query"), (k, "key"), (v, "value"))]
    if "mask" in which:
        kw["attn_mask"] = f(kw["attn_mask"])
    if which == "mod_args":
        kw["mod_args"] = tuple(f(a) for a in kw["mod_args"])
    out, lse = engine.scaled_dot_product_attention(*args, backend=backend, return_lse=True, **kw)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and lse.dtype.isnative
    # a few ulps: a read-only input is a new Numba signature, and a kernel compiled in this process
    # can round differently from the plain one loaded from Numba's disk cache (seen since the
    # GEMM-provider merge: fresh and cached builds of the same kernel differ by 1-2 ulps)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(out, expected, rtol=8 * eps, atol=8 * eps)


def test_big_endian_inputs_to_variants_and_block_masks():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 8)).astype(">f8")
    attn = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    np.testing.assert_array_equal(attn(x)[0], attn(x.astype(np.float64))[0])
    doc = _big_endian(np.arange(9) // 4)
    bm = engine.create_block_mask(doc_only, None, None, 9, 9, mod_args=(doc,), block_q=4, block_k=4)
    q = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    out = engine.scaled_dot_product_attention(q, q, q, block_mask=bm, backend="cpu")
    ref = engine.scaled_dot_product_attention(
        q, q, q, mask_mod=doc_only, mod_args=(np.arange(9) // 4,), backend="reference"
    )
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_read_only_operands_share_one_compiled_signature():
    """Whichever of query/key/value is read-only, the cpu kernel gets all three read-only: one
    compiled signature for every combination (Numba types each combination apart: seconds of
    compiling each, for a user and in CI)."""
    from engine.kernels.cpu.flash_fwd import flash_kernel

    kernel = flash_kernel(None, None, serial=True)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 11, 8)).astype(np.float32) for _ in range(3))
    expected = engine.scaled_dot_product_attention(q, k, v, backend="cpu")
    before = set(kernel.signatures)
    eps = 8 * np.finfo(np.float32).eps
    for which in ("query", "key", "value", "all"):
        args = [_read_only(a) if which in (name, "all") else a for a, name in ((q, "query"), (k, "key"), (v, "value"))]
        for _ in range(2):  # the second call runs on the call plan's plain path
            out = engine.scaled_dot_product_attention(*args, backend="cpu")
            np.testing.assert_allclose(out, expected, rtol=eps, atol=eps)
    assert len(set(kernel.signatures) - before) <= 1
