"""engine.distributed.apply_variant: every registered variant over a dask array of sequences,
equal to one call; parameters shipped to each worker process once."""

import numpy as np
import pytest

import engine

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")

import engine.distributed as ed  # noqa: E402
from engine.distributed import variants as dv  # noqa: E402

pytestmark = pytest.mark.xdist_group("dask")


@pytest.mark.parametrize("name", engine.list_variants())
def test_every_variant_over_chunks_of_sequences(dask_client, name):
    from engine.plugins.registry import variant_info

    params = variant_info()[0][name].cls.example_params(embed_dim=16, num_heads=2)
    variant = engine.get_variant(name, **params, seed=0)
    # the reference backend: what is tested here is the distribution (chunks along N, per-sequence
    # keywords, the variant shipped), not the kernels, so no worker compiles a kernel per variant
    inputs = dict(variant.example_inputs(7, 12, key_length=10, rng=3), backend="reference")
    query = inputs.pop("query")
    expected, _ = variant(query, **inputs)
    lazy = {
        n: da.from_array(x, chunks=(3,) + x.shape[1:])
        if isinstance(x, np.ndarray) and x.ndim >= 2 and x.shape[0] == 7 and n != "attn_mask"
        else x
        for n, x in inputs.items()
    }
    out = ed.apply_variant(variant, da.from_array(query, chunks=(3, 12, query.shape[2])), **lazy)
    assert isinstance(out, da.Array) and out.chunks[0] == (3, 3, 1)
    got = dask_client.compute(out, sync=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_numpy_input_chunked_along_n_and_batch_first_false(dask_client):
    variant = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=1, batch_first=False)
    x = np.random.default_rng(0).standard_normal((300, 20, 8)).astype(np.float32)  # (L, N, E)
    out = ed.apply_variant(variant, x, is_causal=True)
    assert out.chunks == ((300,), (6, 6, 6, 2), (8,))  # 2048 // 300 = 6 sequences per chunk
    np.testing.assert_allclose(dask_client.compute(out, sync=True), variant(x, is_causal=True)[0], rtol=0, atol=1e-5)


from variants.multi_head import MultiHeadAttention  # noqa: E402


class CountingMultiHead(MultiHeadAttention):
    """multi-head that counts, per process, how often it is unpickled (sent to a process)."""

    name = "counting-multi-head"

    def __setstate__(self, state):
        import engine.distributed.variants as mod

        mod._test_unpickled = getattr(mod, "_test_unpickled", 0) + 1
        self.__dict__.update(state)


def _unpickled():
    import engine.distributed.variants as mod

    return getattr(mod, "_test_unpickled", 0)


def test_parameters_reach_each_worker_once(dask_process_client):
    variant = CountingMultiHead(embed_dim=8, num_heads=2, seed=0)
    x = np.random.default_rng(1).standard_normal((24, 5, 8)).astype(np.float32)
    out = ed.apply_variant(variant, da.from_array(x, chunks=(2, 5, 8)))  # 12 tasks
    before = dask_process_client.run(_unpickled)
    np.testing.assert_allclose(dask_process_client.compute(out, sync=True), variant(x)[0], rtol=0, atol=1e-5)
    received = {w: n - before[w] for w, n in dask_process_client.run(_unpickled).items()}
    assert sum(received.values()) >= 1 and all(n <= 1 for n in received.values()), received
    graph = dict(out.__dask_graph__())
    assert sum(isinstance(t, dv.VariantCall) for t in graph.values()) == 1


def test_bad_inputs_refused_before_any_task():
    variant = engine.get_variant("multi-head", embed_dim=8, num_heads=2, seed=0)
    x = da.zeros((6, 5, 8), chunks=(2, 5, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="engine.Variant instance"):
        ed.apply_variant("multi-head", x)
    with pytest.raises(ValueError, match="chunked along its sequence axis"):
        ed.apply_variant(variant, x.rechunk((2, 2, 8)))
    with pytest.raises(ValueError, match="3 dimensions"):
        ed.apply_variant(variant, x[0])
    with pytest.raises(ValueError, match="chunked like query"):
        ed.apply_variant(variant, x, key=x.rechunk((3, 5, 8)))
    with pytest.raises(ValueError, match="need_weights"):
        ed.apply_variant(variant, x, need_weights=True)
    with pytest.raises(ValueError):  # the variant's own check, from the call on zero sequences
        ed.apply_variant(variant, da.zeros((6, 5, 7), chunks=(2, 5, 7), dtype=np.float32))
