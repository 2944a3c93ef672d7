"""Attention on Dask: dask arrays in, lazy dask arrays out, computed wherever Dask runs its tasks.

``import engine.distributed as ed`` needs the ``dask`` extra (``pip install
"attention-engine[dask]"``: dask[array], distributed, zarr); ``import engine`` never imports Dask.

* :func:`scaled_dot_product_attention`: the functional API over dask arrays. Batch, head and
  query chunks are independent tasks; key chunks are split-KV: each (query chunk, key chunk) task
  returns ``(out, lse)`` from the ``cpu`` backend and a tree of :func:`engine.merge_attention`
  tasks combines them exactly, in a fixed order.
* :func:`apply_variant`: any registered variant over a dask array of sequences chunked along N.

The user guide is ``docs/distributed.md`` ("Scaling out").
"""

try:
    import dask.array  # noqa: F401  (fails here, with the message below, without the extra)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"engine.distributed needs Dask: pip install 'attention-engine[dask]' (dask[array], distributed, zarr); {exc}"
    ) from None

from .attention import scaled_dot_product_attention
from .chunking import default_chunks
from .variants import apply_variant

__all__ = ["scaled_dot_product_attention", "apply_variant", "default_chunks"]
