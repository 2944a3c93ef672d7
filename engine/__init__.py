"""attention-engine: a Numba-accelerated attention engine with pluggable variants.

Importing this package is cheap: no kernel is compiled and no plugin is loaded until first use.
Everything a variant plugin needs is a name of this package (the built-in variants import nothing
else); the layers below it are described in ``docs/architecture.md``.
"""

from .backward import scaled_dot_product_attention_backward
from .decoding import attention_with_kvcache
from .dispatch import get_backend, list_backends
from .functional import scaled_dot_product_attention
from .merge import merge_attention
from .plugins.hookspecs import hookimpl
from .plugins.manager import get_plugin_manager
from .plugins.registry import get_variant, list_variants, register_plugin, unregister_plugin
from .problems.causal import causal_lower_right
from .problems.masks import mha_masks_to_sdpa
from .problems.mods import BlockMask, cast_like, create_block_mask, with_score_grad
from .runtime.errors import NotSupportedError, PluginError
from .runtime.gemm_providers import get_gemm_provider, set_gemm_provider
from .runtime.threads import configure_threading_layer, get_num_threads, set_num_threads
from .variant import Variant
from .varlen import varlen_attention, varlen_attention_backward
from .weights import attention_weights

__version__ = "0.2.0"

# Numba's layer is chosen once, when its thread pool starts: pinned now (1-2 ms), so that a
# numba.set_num_threads or parallel=True function of the user's after this import starts TBB too
configure_threading_layer()
del configure_threading_layer


def __getattr__(name):
    # plot_attention needs matplotlib: imported on first use, not with the engine
    if name == "plot_attention":
        from .plotting import plot_attention

        return plot_attention
    # the vectorisable exp and tanh for mods (Numba overloads): loaded when a mod asks for them
    if name in ("fast_exp", "fast_tanh"):
        from .kernels import fastexp

        return getattr(fastexp, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "list_variants",
    "get_variant",
    "list_backends",
    "get_backend",
    "plot_attention",
    "register_plugin",
    "unregister_plugin",
    "get_plugin_manager",
    "hookimpl",
    "Variant",
    "PluginError",
    "NotSupportedError",
    "create_block_mask",
    "BlockMask",
    "set_num_threads",
    "get_num_threads",
    "__version__",
    "merge_attention",
    "causal_lower_right",
    "attention_with_kvcache",
    "varlen_attention",
    "varlen_attention_backward",
    "set_gemm_provider",
    "get_gemm_provider",
    "attention_weights",
    "mha_masks_to_sdpa",
    "cast_like",
    "with_score_grad",
    "fast_exp",
    "fast_tanh",
]
