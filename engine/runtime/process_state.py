"""What the process state adds to every cached runner's key (``engine.plan``'s call plans, the
``cpu`` backend's decode routes): a runner made under other threads, another GEMM provider or
other measured tiles is not reused."""

from __future__ import annotations

from .gemm_providers import selection_token
from .threads import get_num_threads
from .tuning import state_token

__all__ = ["runtime_token"]


def runtime_token():
    """The calling thread's kernel thread count, the GEMM provider selection
    (``set_gemm_provider`` and ``ATTENTION_ENGINE_GEMM``) and the state of the measured tiles and
    provider (``engine.runtime.tuning.state_token``)."""
    return (get_num_threads(), selection_token(), state_token())
