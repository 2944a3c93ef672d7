"""``attention-engine bench``: compare every variant on every backend, against torch.

The sweep has one *case* per selected variant plus the functional case ``sdpa``
(``engine.scaled_dot_product_attention`` on ``(N, heads, L, head_dim)`` arrays). The cases run one
after the other in a child process (a new one replaces it if it dies), each over every length in
ascending order. At each length the child builds one *implementation* per selected backend plus the
baselines, then

1. calls each once (``first_call_s``: at the first length that uses a kernel, this includes its JIT
   compilation or the loading of Numba's disk cache),
2. checks every output against the baseline's (``max_abs_diff``),
3. measures each call's peak memory: the child resets its own peak resident size
   (``/proc/self/clear_refs``), returns freed heap pages to the system (``malloc_trim``), and
   reports ``VmHWM`` after the call minus ``VmRSS`` before it, so inputs, imports and compiled code
   are not counted while the outputs and every temporary are,
4. times the implementations in alternating rounds (the order rotates each round; ``--repeat``
   rounds, each at least ``MIN_ROUND_S`` long, fewer but at least 3 for slow calls) and keeps the
   median.

An implementation whose next length is predicted (quadratically, from the last one) to take over
``--max-call-s`` per call is skipped from there on, with a row that says so.

Baselines, run with the same thread count as the engine: ``torch.nn.MultiheadAttention`` loaded
with the variant's own weights for the variant cases (the benchmark checks that its output
matches; a variant without an output projection gets an identity ``out_proj``) and
``torch.nn.functional.scaled_dot_product_attention`` for ``sdpa``. Without torch the baselines are
the variant on the ``reference`` backend and plain NumPy. ``sdpa`` also has a plain-NumPy row that
materialises the float32 score matrix.

The output answers one question first: per case and length, is the engine faster or slower than
torch, by how much, and with how much memory (the summary); the full table follows.

Modules, one job each: :mod:`.cli` (options and the run), :mod:`.worker` (the child process and its
protocol), :mod:`.measure` (one case at one length), :mod:`.baselines` (torch layers, NumPy
attention, operation counts; reused by ``bench/``), :mod:`.machine`, :mod:`.report` (summary, table,
JSON), :mod:`.plot`.
"""

from ..runtime.machine import machine_info
from .baselines import (
    as_torch_inputs,
    available_backends,
    device_synchronizer,
    numpy_sdpa,
    sdpa_flop,
    torch_mha_forward,
    torch_mha_like,
    variant_flop,
)
from .cli import DEFAULT_LENGTHS, FULL_LENGTHS, add_arguments, run
from .measure import predicted_skip
from .plot import write_plot
from .report import format_summary, format_table

__all__ = [
    "add_arguments",
    "run",
    "numpy_sdpa",
    "torch_mha_like",
    "torch_mha_forward",
    "variant_flop",
    "sdpa_flop",
    "available_backends",
    "machine_info",
    "device_synchronizer",
    "as_torch_inputs",
    "format_table",
    "format_summary",
    "write_plot",
    "predicted_skip",
    "DEFAULT_LENGTHS",
    "FULL_LENGTHS",
]
