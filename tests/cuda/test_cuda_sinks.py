"""Attention sinks on the ``cuda`` backend (host arrays), against the ``reference`` oracle: the
forward and decoding (split-KV: the sink counted once), where the sink step runs around the op,
and the backward, whose FlashAttention-2 kernels take the forward's lse with the sinks unchanged.

As the other CUDA test files: run where a CUDA target exists; without a GPU, in the simulator
run of ``tests/cuda/test_simulator.py`` (marked ``simulator``). Tiny shapes and tiles (4 query rows, 8 keys), so several
tiles and partial tiles run.
"""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.backends.cuda import CudaBackend
from engine.problems.attention import BackwardProblem
from engine.problems.backward import validate_backward_args

from simulator import SIMULATOR as SIM

pytestmark = pytest.mark.simulator
GPU = not SIM and engine.get_backend("cuda").unavailable_reason() is None
needs_cuda = pytest.mark.skipif(
    not (SIM or GPU), reason="no CUDA target here; run under the simulator by test_simulator.py"
)
SMALL = CudaBackend(block_q=4, block_k=8)


def _case(rng):
    q = rng.standard_normal((1, 4, 6, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 11, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 11, 4)).astype(np.float32)
    sinks = np.array([0.5, -1.0, 2.0, -np.inf], np.float32)
    mask = rng.random((6, 11)) > 0.3
    mask[3] = False  # a row with no visible key
    return q, k, v, sinks, mask


@needs_cuda
def test_forward_and_backward():
    rng = np.random.default_rng(0)
    q, k, v, sinks, mask = _case(rng)
    kw = dict(attn_mask=mask, enable_gqa=True, sinks=sinks)
    got = engine.scaled_dot_product_attention(q, k, v, **kw, return_lse=True, backend="cuda")
    want = engine.scaled_dot_product_attention(q, k, v, **kw, return_lse=True, backend="reference")
    np.testing.assert_allclose(got[0], want[0], atol=2e-6)
    np.testing.assert_allclose(got[1], want[1], atol=2e-6)
    g = rng.standard_normal(want[0].shape).astype(np.float32)
    problem = validate_backward_args(g, q, k, v, *want, **kw)
    small = SMALL.op(BackwardProblem).run(problem)[:3]  # several tiles, partial ones
    grads = engine.scaled_dot_product_attention_backward(
        g, q, k, v, *want, **kw, return_sinks_grad=True, backend="cuda"
    )
    ref = engine.scaled_dot_product_attention_backward(
        g, q, k, v, *want, **kw, return_sinks_grad=True, backend="reference"
    )
    for got_grads in (small, grads):
        for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got_grads, ref):
            np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, float(np.abs(b).max())), err_msg=name)


@needs_cuda
def test_decode_with_split_kv():
    rng = np.random.default_rng(1)
    B, Hq, Hkv, D, S_max = 2, 4, 2, 8, 40
    case = dict(
        query=rng.standard_normal((B, Hq, 2, D)).astype(np.float32),
        k_cache=rng.standard_normal((B, Hkv, S_max, D)).astype(np.float32),
        v_cache=rng.standard_normal((B, Hkv, S_max, D)).astype(np.float32),
        cache_seqlens=np.array([30, 5], np.int32),
        sinks=np.array([1.0, 0.0, -2.0, 3.0], np.float32),
    )
    want = engine.attention_with_kvcache(**case, return_lse=True, backend="reference")
    got = engine.attention_with_kvcache(**case, return_lse=True, num_splits=3, backend="cuda")
    np.testing.assert_allclose(got[0], want[0], atol=2e-6)
    np.testing.assert_allclose(got[1], want[1], atol=2e-6)
