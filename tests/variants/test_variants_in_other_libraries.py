"""Variants computing in the array library of their inputs (the device path of the built-in ones).

A torch CUDA tensor or a CuPy array makes a variant project on its GPU with device copies of its
weights and attend on the ``cuda`` backend in place; that path is the array-API code of
``MultiHeadAttention.forward``. CI has no GPU, so here torch CPU tensors and ``array_api_strict``
arrays (a minimal, strict array-API library: any NumPy-only call in that code fails on it) are
declared "device" libraries by patching ``engine.variant.input_placement``. Everything except the
attention kernel then runs as on a GPU: projections, weight copies, masks, head split, output
projection, weights, results in the caller's library. The same tests on torch CUDA tensors and
CuPy arrays are in ``tests/cuda/test_cuda_simulator.py`` and run on a real GPU.
"""

import array_api_strict as strict
import numpy as np
import pytest
import torch

import engine
import engine.variant
from engine.problems.arrays import HOST, input_placement, placement_of

from conftest import variant_names

LIBRARIES = {"torch": torch.asarray, "array_api_strict": strict.asarray}


@pytest.fixture(params=sorted(LIBRARIES))
def library(request, monkeypatch):
    """(name, to_library): inputs made with ``to_library`` are treated as device arrays."""
    name = request.param
    kind = torch.Tensor if name == "torch" else type(strict.asarray(0.0))

    def patched(x, what):
        return placement_of(x) if isinstance(x, kind) else input_placement(x, what)

    monkeypatch.setattr(engine.variant, "input_placement", patched)
    return name, LIBRARIES[name]


def _numpy(x):
    return np.asarray(x)


def _params(name, embed_dim, num_heads):
    from engine.plugins.registry import variant_info

    return variant_info()[0][name].cls.example_params(embed_dim, num_heads)


def _inputs_in(inputs, to_library):
    """The example inputs with their query/key/value arrays in another library."""
    return {k: to_library(v) if k in ("query", "key", "value") else v for k, v in inputs.items()}


@pytest.mark.parametrize("name", variant_names())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_variant_computes_in_the_inputs_library(library, name, dtype):
    lib, to_library = library
    variant = engine.get_variant(name, **_params(name, 32, 4), seed=0, dtype=dtype)
    inputs = variant.example_inputs(2, 37, key_length=29, rng=5)
    S = inputs.get("key", inputs["query"]).shape[1]
    kpm = np.zeros((2, S), dtype=bool)
    kpm[1, S - 7 :] = True
    ref, ref_w = variant(**inputs, key_padding_mask=kpm, need_weights=True, backend="cpu")
    out, w = variant(**_inputs_in(inputs, to_library), key_padding_mask=kpm, need_weights=True, backend="cpu")
    assert type(out) is type(to_library(np.zeros(1))) and type(w) is type(out)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert _numpy(out).dtype == dtype
    np.testing.assert_allclose(_numpy(out), ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(_numpy(w), ref_w, atol=tol, rtol=tol)


def test_masks_from_either_side_unbatched_and_causal(library):
    """Host masks are copied to the inputs' library; masks already there are used as they are."""
    lib, to_library = library
    mh = engine.get_variant("multi-head", embed_dim=16, num_heads=4, seed=1)
    x = np.random.default_rng(0).standard_normal((9, 16)).astype(np.float32)
    attn_mask = np.random.default_rng(1).standard_normal((9, 9)).astype(np.float32)
    kpm = np.zeros(9, dtype=bool)
    kpm[6:] = True
    for am, pm in ((attn_mask, kpm), (to_library(attn_mask), to_library(kpm))):
        for causal in (False, True):
            ref, _ = mh(x, attn_mask=attn_mask, key_padding_mask=kpm, is_causal=causal, backend="cpu")
            out, _ = mh(to_library(x), attn_mask=am, key_padding_mask=pm, is_causal=causal, backend="cpu")
            assert tuple(out.shape) == (9, 16)
            np.testing.assert_allclose(_numpy(out), ref, atol=1e-5, rtol=1e-5)


def test_weights_are_copied_once_and_refreshed_by_load_state_dict(library):
    lib, to_library = library
    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    like = to_library(np.zeros((1, 2, 8), np.float32))
    w1 = mh.param("in_proj_weight", like=like)
    assert type(w1) is type(like) and mh.param("in_proj_weight", like=like) is w1
    assert mh.param("in_proj_weight") is mh.param("in_proj_weight", like=np.zeros(1))  # NumPy: no copy
    state = mh.state_dict()
    state["in_proj_weight"] = state["in_proj_weight"] * 2
    mh.load_state_dict(state)
    w2 = mh.param("in_proj_weight", like=like)
    assert w2 is not w1
    np.testing.assert_array_equal(_numpy(w2), state["in_proj_weight"])
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(
        _numpy(mh(to_library(x), backend="cpu")[0]), mh(x, backend="cpu")[0], atol=1e-5, rtol=1e-5
    )


def test_variant_that_computes_in_numpy_gets_host_copies_and_returns_to_the_library(library):
    lib, to_library = library

    class NumpyOnly(engine.Variant):
        name = "numpy-only"
        description = "forward in NumPy (device_arrays = False)"

        def __init__(self):
            super().__init__()
            self.embed_dim = 4

        def forward(self, query, key, value, **kw):
            assert isinstance(query, np.ndarray) and isinstance(kw["key_padding_mask"], np.ndarray)
            return query * 2 + key.sum() - value.sum(), None

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    kpm = np.zeros((2, 3), dtype=bool)
    out, w = NumpyOnly()(to_library(x), key_padding_mask=to_library(kpm))
    assert type(out) is type(to_library(x)) and w is None
    np.testing.assert_array_equal(_numpy(out), x * 2)


def test_inputs_from_different_places_are_refused(library):
    lib, to_library = library
    mh = engine.get_variant("cross", embed_dim=8, num_heads=2, kdim=8, vdim=8)
    x = np.zeros((1, 3, 8), np.float32)
    with pytest.raises(TypeError, match="key is on the host .* but query is on"):
        mh(to_library(x), x)
    with pytest.raises(TypeError, match="value is on .* but query is on the host"):
        mh(x, x, to_library(x))
    with pytest.raises(TypeError, match="query must be floating"):
        mh(to_library(np.zeros((1, 3, 8), np.int32)), to_library(x))


def test_device_arrays_of_other_producers_are_refused_with_a_clear_error():
    """Numba device arrays (here any __cuda_array_interface__ object that is not torch or CuPy)
    have no matrix product: a variant says so instead of failing inside NumPy."""

    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (1, 3, 8), "typestr": "<f4", "data": (0, False), "version": 3}

    mh = engine.get_variant("multi-head", embed_dim=8, num_heads=2)
    with pytest.raises(TypeError, match="query is a device array of type .*FakeDeviceArray.*torch CUDA"):
        mh(FakeDeviceArray())
    assert input_placement(np.zeros(2), "x") is HOST
