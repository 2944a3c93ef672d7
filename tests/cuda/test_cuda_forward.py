"""What only the ``cuda`` backend's forward has, against the ``reference`` oracle.

The forward's behaviour in float32 is specified once, for every backend, in
``tests/forward/test_functional.py``; the simulator run (``tests/simulator.py``) runs it for cuda.
Here: the kernel's 16-bit contract (float32 arithmetic on the exact 16-bit values, one rounding of
out and lse), non-finite values and mods on its own tiles (4 query rows, 8 keys: several tiles,
partial tiles, skipped tiles), the block map it derives and obeys, its tile-size override, the
flat strided layout device arrays are read through, and, on a real GPU only, device arrays in and
out (torch, CuPy, Numba), streams, and every variant on torch CUDA tensors (the simulator's arrays
do not expose ``__cuda_array_interface__``).

Without a GPU these tests run in the simulator run of ``tests/cuda/test_simulator.py`` and skip in
the ordinary run; on a GPU they run on it.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes  # bfloat16 for NumPy (test extra)
import numpy as np
import pytest

import engine
from engine.backends.cuda import CudaBackend
from engine.backends.cuda.operands import flat_layout
from engine.backends.reference import ReferenceBackend
from engine.problems.arrays import is_bfloat16
from engine.problems.attention import validate_attention_args
from engine.problems.mods import EMPTY, FULL, PARTIAL

from simulator import SIMULATOR as SIM
from simulator import default_tiles
from testmods import batch_doc_alibi, batch_same_doc, causal_mod, window_mod
from tolerances import assert_out_close, lse_atol, out_atol

BF16 = np.dtype(ml_dtypes.bfloat16)
#: every storage dtype the kernel takes
DTYPES = [np.float32, np.float16, BF16]
#: the 16-bit ones (float32: tests/forward/test_functional.py, for every backend)
SIXTEEN = [np.float16, BF16]

pytestmark = pytest.mark.simulator
GPU = not SIM and engine.get_backend("cuda").unavailable_reason() is None
HERE = SIM or GPU
needs_cuda = pytest.mark.skipif(not HERE, reason="no CUDA target here; run under the simulator by test_simulator.py")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a real CUDA GPU (device arrays)")

SMALL = CudaBackend(block_q=4, block_k=8)


def _check(problem, out, lse):
    if is_bfloat16(problem.dtype):
        return _check_bf16(problem, out, lse)
    ref_out, ref_lse = ReferenceBackend().run(problem)
    # NaN inputs make NaN rows (checked as a pattern); the bound comes from the finite values
    q, k, v = (np.nan_to_num(np.asarray(a)) for a in (problem.query, problem.key, problem.value))
    assert np.asarray(out).dtype == problem.dtype and np.asarray(lse).dtype == problem.dtype
    scale = problem.scale
    mask = problem.attn_mask
    if problem.dtype == np.float16:
        # float32 arithmetic, then one rounding to float16 (unit roundoff 2^-11) of out and lse
        f32 = out_atol(np.float32, q, k, v, scale, mask)
        atol = 2.0**-10 * max(1.0, float(np.max(np.abs(v.astype(np.float64)), initial=0))) + f32
        fin = np.isfinite(ref_lse)
        big = float(np.max(np.abs(ref_lse[fin].astype(np.float64)), initial=0))
        latol = 2.0**-10 * max(1.0, big) + lse_atol(np.float32, q, k, scale, mask)
    else:
        atol = out_atol(problem.dtype, q, k, v, scale, mask)
        latol = lse_atol(problem.dtype, q, k, scale, mask)
    assert_out_close(out, ref_out, atol, "cuda out")
    assert_out_close(lse, ref_lse, latol, "cuda lse")


def _check_bf16(problem, out, lse):
    """bfloat16: the kernel computes in float32 on the exact values of its inputs (a float mask
    cast to bfloat16 first, as host masks are cast to the storage dtype) and rounds out and lse
    once to bfloat16 (unit roundoff 2^-8). The oracle gets those float32 values."""
    assert np.asarray(out).dtype == BF16 and np.asarray(lse).dtype == BF16

    def f32(a):
        return a.astype(BF16).astype(np.float32)

    mask = problem.attn_mask
    if mask is not None and problem.mask_kind == "float":
        mask = f32(mask)
    p32 = dataclasses.replace(
        problem,
        query=f32(problem.query),
        key=f32(problem.key),
        value=f32(problem.value),
        attn_mask=mask,
        dtype=np.dtype(np.float32),
    )
    ref_out, ref_lse = ReferenceBackend().run(p32)
    q, k, v = (np.nan_to_num(a) for a in (p32.query, p32.key, p32.value))
    atol = 2.0**-7 * max(1.0, float(np.max(np.abs(v), initial=0))) + out_atol(np.float32, q, k, v, problem.scale, mask)
    fin = np.isfinite(ref_lse)
    big = float(np.max(np.abs(ref_lse[fin]), initial=0))
    latol = 2.0**-7 * max(1.0, big) + lse_atol(np.float32, q, k, problem.scale, mask)
    assert_out_close(np.asarray(out).astype(np.float32), ref_out, atol, "cuda out (bfloat16)")
    assert_out_close(np.asarray(lse).astype(np.float32), ref_lse, latol, "cuda lse (bfloat16)")


def _run(q, k, v, backend=SMALL, **kw):
    problem = validate_attention_args(q, k, v, return_lse=True, **kw)
    assert not backend.not_supported_reasons(problem)
    out, lse = backend.run(problem)
    assert out.shape == problem.out_shape and lse.shape == problem.lse_shape
    _check(problem, out, lse)
    return out, lse


def _qkv(rng, qshape, kshape, Ev, dtype=np.float32):
    q = rng.standard_normal(qshape).astype(dtype)
    k = rng.standard_normal(kshape).astype(dtype)
    v = rng.standard_normal(kshape[:-1] + (Ev,)).astype(dtype)
    return q, k, v


# (query shape, key shape, Ev): L and S are not multiples of the 4 x 8 tiles, E != Ev
SHAPES = [
    ((2, 3, 13, 8), (2, 3, 21, 8), 5),
    ((6, 4), (9, 4), 3),  # 2-D: one head, no batch
    ((2, 2, 2, 5, 7), (2, 2, 2, 11, 7), 7),  # two batch dims
    ((1, 2, 17, 4), (1, 2, 6, 4), 4),  # L > S
]


@needs_cuda
@pytest.mark.parametrize("dtype", SIXTEEN, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
def test_no_mask_and_causal(rng, shapes, dtype):
    qs, ks, ev = shapes
    q, k, v = _qkv(rng, qs, ks, ev, dtype)
    _run(q, k, v)
    _run(q, k, v, is_causal=True)


@needs_cuda
@pytest.mark.parametrize("dtype", SIXTEEN, ids=lambda d: np.dtype(d).name)
def test_gqa_and_custom_scale(rng, dtype):
    q, k, v = _qkv(rng, (2, 6, 9, 8), (2, 2, 10, 8), 6, dtype)
    _run(q, k, v, enable_gqa=True, scale=0.3)
    _run(q, k, v, enable_gqa=True, is_causal=True, scale=2.0)


@needs_cuda
@pytest.mark.parametrize("dtype", SIXTEEN, ids=lambda d: np.dtype(d).name)
def test_boolean_masks_broadcast_and_fully_masked_rows(rng, dtype):
    q, k, v = _qkv(rng, (2, 3, 7, 8), (2, 3, 11, 8), 5, dtype)
    ls = rng.random((7, 11)) > 0.4
    ls[2] = False  # row 2 sees nothing in every head
    out, lse = _run(q, k, v, attn_mask=ls)
    assert np.all(out[:, :, 2] == 0) and np.all(np.isneginf(lse[:, :, 2]))
    pad = np.ones((2, 1, 1, 11), dtype=bool)
    pad[1, ..., 6:] = False  # key padding of batch entry 1
    _run(q, k, v, attn_mask=pad)
    per_head = rng.random((3, 1, 11)) > 0.5  # (Hq, 1, S)
    per_head[1] = False  # head 1 sees nothing at all
    out, lse = _run(q, k, v, attn_mask=per_head)
    assert np.all(out[:, 1] == 0) and np.all(np.isneginf(lse[:, 1]))


@needs_cuda
@pytest.mark.parametrize("dtype", SIXTEEN, ids=lambda d: np.dtype(d).name)
def test_float_masks(rng, dtype):
    q, k, v = _qkv(rng, (2, 2, 6, 4), (2, 2, 13, 4), 4, dtype)
    full = rng.standard_normal((2, 2, 6, 13)).astype(dtype)
    full[0, 1, 3] = -np.inf  # a fully masked row
    full[1, 0, :, 5] = -np.inf  # one key hidden from every row
    out, lse = _run(q, k, v, attn_mask=full)
    assert np.all(out[0, 1, 3] == 0) and np.isneginf(lse[0, 1, 3])
    _run(q, k, v, attn_mask=rng.standard_normal((13,)).astype(np.float64))  # (S,), cast to dtype


@needs_cuda
def test_nan_score_propagates_to_its_row_only(rng):
    q, k, v = _qkv(rng, (1, 1, 6, 4), (1, 1, 9, 4), 3)
    q[0, 0, 4, 1] = np.nan
    out, lse = _run(q, k, v)
    assert np.isnan(out[0, 0, 4]).all() and np.isfinite(np.delete(out[0, 0], 4, axis=0)).all()


@needs_cuda
def test_nonfinite_values_reach_only_rows_that_attend_to_them(rng):
    """A NaN/inf in V behind a mask (or right of the causal diagonal) leaves the other rows clean:
    their weight for that key is 0, and 0 * NaN must not be added."""
    q, k, v = _qkv(rng, (1, 2, 6, 4), (1, 2, 11, 4), 3)
    v[0, 0, 9, 1] = np.nan
    v[0, 1, 3, 0] = np.inf
    mask = np.ones((6, 11), dtype=bool)
    mask[:4, 9] = False  # rows 0-3 of head 0 never see the NaN
    mask[2:, 3] = False  # rows 2-5 of head 1 never see the inf
    out, _ = _run(q, k, v, attn_mask=mask)
    assert np.isfinite(out[0, 0, :4]).all() and np.isnan(out[0, 0, 4:, 1]).all()
    assert np.isfinite(out[0, 1, 2:]).all() and np.isinf(out[0, 1, :2, 0]).all()
    out, _ = _run(q, k, v, is_causal=True)
    assert np.isfinite(out[0, 1, :3]).all()


@needs_cuda
def test_public_api_with_default_tiles(rng):
    """Through ``scaled_dot_product_attention`` and the registered backend (128-row tiles)."""
    q, k, v = _qkv(rng, (1, 1, 5, 4), (1, 1, 7, 4), 3)
    with default_tiles():
        out, lse = engine.scaled_dot_product_attention(q, k, v, backend="cuda", return_lse=True)
    problem = validate_attention_args(q, k, v, return_lse=True)
    _check(problem, out, lse)
    assert isinstance(out, np.ndarray)


def test_flat_layout_reaches_every_element_of_strided_and_broadcast_arrays():
    """The offsets/strides the kernel indexes with, checked on host arrays (no CUDA needed)."""
    base = np.arange(2 * 5 * 3 * 4, dtype=np.float32).reshape(2, 5, 3, 4)
    cases = [
        base.transpose(0, 2, 1, 3),  # permuted
        base[:, ::-2].transpose(0, 2, 1, 3),  # negative stride
        np.broadcast_to(base[:1, :1, :1], (2, 1, 1, 4)),
    ]  # zero strides
    for a in cases:
        lo, span, offs, st = flat_layout(a.shape, a.strides, a.itemsize, a.shape[:1], 4)
        start = _first_index(a, base) + lo  # the flat view the device path builds
        flat = np.frombuffer(base.data, dtype=base.dtype)[start : start + span]
        assert flat.size == span
        for b in range(a.shape[0]):
            for h in range(a.shape[1]):
                for i in range(a.shape[2]):
                    for e in range(a.shape[3]):
                        assert flat[offs[b] + h * st[0] + i * st[1] + e * st[2]] == a[b, h, i, e]
    # a mask of shape (S,) broadcast over (batch 3, heads, L): every axis but the last has stride 0
    lo, span, offs, st = flat_layout((6,), (8,), 8, (3,), 4)
    assert (lo, span, list(offs), st) == (0, 6, [0, 0, 0], (0, 0, 1))
    with pytest.raises(ValueError, match="not a multiple of its item size"):
        flat_layout((2, 3), (6, 2), 4, (), 3)


def _first_index(a, base):
    """Element index of a[0, ..., 0] inside base's buffer."""
    return (a.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // base.itemsize


# ---- score_mod / mask_mod compiled into the kernel ----------------------------------------------


def _run_mods(q, k, v, backend=SMALL, **kw):
    """The cuda kernel with mods against the reference backend, which applies the same mods to
    the materialised score matrix."""
    problem = validate_attention_args(q, k, v, return_lse=True, **kw)
    assert not backend.not_supported_reasons(problem)
    out, lse = backend.run(problem)
    if is_bfloat16(problem.dtype):
        _check_bf16(problem, out, lse)  # its oracle applies the same mods
        return out, lse
    ref_out, ref_lse = ReferenceBackend().run(problem)
    atol = 2e-5 if problem.dtype == np.float32 else 4e-3
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=atol * 10, rtol=0)
    return out, lse


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_score_mods_alibi_and_softcap(rng, dtype):
    from variants.alibi import alibi_bias, alibi_slopes
    from variants.softcap import tanh_softcap

    q, k, v = _qkv(rng, (2, 3, 13, 8), (2, 3, 21, 8), 5, dtype)
    _run_mods(q, k, v, score_mod=alibi_bias, mod_args=(alibi_slopes(3).astype(np.float32),))
    _run_mods(3 * q, k, v, score_mod=tanh_softcap, mod_args=(np.float32(1.5),), is_causal=True)


@needs_cuda
def test_mask_mods_with_tile_skipping_and_partial_tiles(rng):
    from variants.alibi import alibi_slopes
    from variants.document import same_document

    q, k, v = _qkv(rng, (2, 3, 21, 8), (2, 3, 21, 8), 5)
    # width 3 with 4 x 8 tiles: every query tile has empty, partial and (left/right) no full tiles
    out, _ = _run_mods(q, k, v, mask_mod=window_mod, mod_args=(3, 0))
    kinds = engine.create_block_mask(window_mod, None, None, 21, 21, mod_args=(3, 0), block_q=4, block_k=8).kinds
    assert (kinds == EMPTY).any() and (kinds == PARTIAL).any()
    # a document mask from a 2-D argument, combined with a score_mod sharing the same tuple
    ids = np.stack([np.repeat([0, 1, 2], 7), np.sort(rng.integers(0, 4, 21))])

    _run_mods(q, k, v, mask_mod=same_document, mod_args=(ids,))
    _run_mods(q, k, v, score_mod=batch_doc_alibi, mask_mod=batch_same_doc, mod_args=(ids, alibi_slopes(3)))
    # a block mask built once (at the cpu's tiles) serves the cuda kernel, whose map it derives
    bm = engine.create_block_mask(window_mod, None, None, 21, 21, mod_args=(3, 0))
    np.testing.assert_array_equal(_run_mods(q, k, v, block_mask=bm)[0], out)


@needs_cuda
def test_kernel_obeys_the_block_map(rng):
    """Tiles marked empty are skipped, tiles marked full never evaluate the mask: with a map that
    says so on purpose, the result equals the dense mask that the map (not the mask_mod) implies."""
    q, k, v = _qkv(rng, (1, 1, 8, 4), (1, 1, 16, 4), 4)
    bm = engine.create_block_mask(causal_mod, None, None, 8, 16, block_q=4, block_k=8)
    assert bm.kinds[0, 0].tolist() == [[PARTIAL, EMPTY], [PARTIAL, EMPTY]]
    bm.kinds[0, 0, 1, 0] = FULL  # rows 4-7 see keys 0-7 whole
    bm.kinds[0, 0, 0, 0] = EMPTY  # rows 0-3 see nothing
    out, lse = SMALL.run(validate_attention_args(q, k, v, block_mask=bm, return_lse=True))
    dense = np.zeros((8, 16), dtype=bool)
    dense[4:, :8] = True
    ref_out, ref_lse = ReferenceBackend().run(validate_attention_args(q, k, v, attn_mask=dense, return_lse=True))
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    assert np.all(out[0, 0, :4] == 0) and np.all(np.isneginf(lse[0, 0, :4]))


@needs_cuda
def test_mods_through_the_public_api_and_a_variant(rng):
    q, k, v = _qkv(rng, (1, 2, 9, 4), (1, 2, 9, 4), 4)
    out = engine.scaled_dot_product_attention(q, k, v, mask_mod=window_mod, mod_args=(2, 1), backend="cuda")
    ref = engine.scaled_dot_product_attention(q, k, v, mask_mod=window_mod, mod_args=(2, 1), backend="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    attn = engine.get_variant("alibi", embed_dim=16, num_heads=2, seed=0)
    x = rng.standard_normal((1, 7, 16)).astype(np.float32)
    np.testing.assert_allclose(attn(x, backend="cuda")[0], attn(x, backend="reference")[0], atol=2e-5, rtol=0)


# ---- real GPU only: device arrays in place, results in the caller's kind, streams ---------------


@needs_gpu
def test_numba_device_arrays_in_and_out(rng):
    from numba import cuda

    q, k, v = _qkv(rng, (2, 3, 70, 64), (2, 3, 90, 64), 32)
    dq, dk, dv = (cuda.to_device(a) for a in (q, k, v))
    out, lse = engine.scaled_dot_product_attention(dq, dk, dv, is_causal=True, return_lse=True)
    assert cuda.is_cuda_array(out)
    _check(validate_attention_args(q, k, v, is_causal=True, return_lse=True), out.copy_to_host(), lse.copy_to_host())


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_cuda_tensors_strided_and_masked(rng, dtype):
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 150, 4, 64, device="cuda", dtype=getattr(torch, dtype))  # (B, L, H, E)
    q = x.transpose(1, 2)  # strided view
    mask = torch.rand(2, 1, 1, 150, device="cuda") > 0.3
    out, lse = engine.scaled_dot_product_attention(q, q, q, attn_mask=mask, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == q.dtype
    assert isinstance(lse, torch.Tensor) and lse.shape == (2, 4, 150)
    host = [t.cpu().numpy() for t in (q, q, q)]
    _check(
        validate_attention_args(*host, attn_mask=mask.cpu().numpy(), return_lse=True),
        out.cpu().numpy(),
        lse.cpu().numpy(),
    )


@needs_gpu
def test_torch_bfloat16_cuda_tensors_strided_and_masked(rng):
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 150, 4, 64, device="cuda", dtype=torch.bfloat16)  # (B, L, H, E)
    q = x.transpose(1, 2)  # strided view
    mask = torch.randn(2, 1, 1, 150, device="cuda", dtype=torch.bfloat16)
    mask[1, ..., 100:] = -float("inf")
    out, lse = engine.scaled_dot_product_attention(q, q, q, attn_mask=mask, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.bfloat16
    assert lse.dtype == torch.bfloat16 and lse.shape == (2, 4, 150)

    def host(t):  # the same bits as ml_dtypes' bfloat16
        return t.contiguous().cpu().view(torch.uint16).numpy().view(BF16)

    _check(
        validate_attention_args(host(q), host(q), host(q), attn_mask=host(mask), return_lse=True), host(out), host(lse)
    )
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert (out.float() - ref.float()).abs().max().item() <= 2.0**-6 * q.float().abs().max().item()


@needs_gpu
def test_cupy_arrays_in_and_out(rng):
    cp = pytest.importorskip("cupy")
    q, k, v = _qkv(rng, (1, 2, 33, 16), (1, 2, 40, 16), 8)
    out = engine.scaled_dot_product_attention(cp.asarray(q), cp.asarray(k), cp.asarray(v))
    assert isinstance(out, cp.ndarray)
    ref = ReferenceBackend().run(validate_attention_args(q, k, v))[0]
    assert_out_close(cp.asnumpy(out), ref, out_atol(np.float32, q, k, v, None), "cupy out")


@needs_gpu
def test_concurrent_torch_streams(rng):
    torch = pytest.importorskip("torch")
    qs = [torch.randn(1, 8, 512, 64, device="cuda") for _ in range(4)]
    streams = [torch.cuda.Stream() for _ in qs]
    outs = []
    for q, s in zip(qs, streams):
        with torch.cuda.stream(s):
            outs.append(engine.scaled_dot_product_attention(q, q, q, is_causal=True))
    torch.cuda.synchronize()
    for q, out in zip(qs, outs):
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def _variant_params(name):
    from engine.plugins.registry import variant_info

    return variant_info()[0][name].cls.example_params(32, 4)


@needs_gpu
@pytest.mark.parametrize("name", engine.list_variants())
def test_every_variant_on_torch_cuda_tensors_stays_on_the_gpu(name):
    """Projections on the GPU with device copies of the weights, attention on ``cuda`` (picked by
    ``auto``), results torch CUDA tensors; compared with the same layer on NumPy inputs."""
    torch = pytest.importorskip("torch")
    variant = engine.get_variant(name, **_variant_params(name), seed=0)
    inputs = variant.example_inputs(2, 150, key_length=97, rng=3)
    S = inputs.get("key", inputs["query"]).shape[1]
    kpm = np.zeros((2, S), dtype=bool)
    kpm[1, S - 20 :] = True
    ref, ref_w = variant(**inputs, key_padding_mask=kpm, need_weights=True, backend="cpu")
    dev = {k: torch.asarray(v, device="cuda") for k, v in inputs.items()}  # document_ids too
    out, w = variant(**dev, key_padding_mask=torch.asarray(kpm, device="cuda"), need_weights=True)
    assert out.is_cuda and w.is_cuda and out.dtype == torch.float32
    assert variant.param(next(iter(variant.state_dict())), like=out).is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(w.cpu().numpy(), ref_w, atol=1e-5, rtol=1e-4)


@needs_gpu
def test_variant_on_cupy_arrays_with_host_mask():
    cp = pytest.importorskip("cupy")
    mh = engine.get_variant("multi-head", embed_dim=32, num_heads=4, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 70, 32)).astype(np.float32)
    mask = np.triu(np.ones((70, 70), dtype=bool), 1)
    out, _ = mh(cp.asarray(x), attn_mask=mask)
    assert isinstance(out, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(out), mh(x, attn_mask=mask, backend="cpu")[0], atol=2e-5, rtol=1e-4)
