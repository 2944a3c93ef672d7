"""attention-engine: a Numba-accelerated attention engine with pluggable variants.

Importing this package is cheap: no kernel is compiled and no plugin is loaded until first use.
"""

from .backward import scaled_dot_product_attention_backward
from .causal import causal_lower_right
from .decoding import attention_with_kvcache
from .dispatch import get_backend, list_backends
from .errors import NotSupportedError
from .functional import scaled_dot_product_attention
from .gemm_providers import get_gemm_provider, set_gemm_provider
from .hookspecs import hookimpl
from .merge import merge_attention
from .mods import BlockMask, create_block_mask
from .plugins import PluginError, get_plugin_manager, get_variant, list_variants, register_plugin, unregister_plugin
from .threads import get_num_threads, set_num_threads
from .variant import Variant

__version__ = "0.2.0"


def __getattr__(name):
    # plot_attention needs matplotlib: imported on first use, not with the engine
    if name == "plot_attention":
        from .plotting import plot_attention

        return plot_attention
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
    "set_gemm_provider",
    "get_gemm_provider",
]
