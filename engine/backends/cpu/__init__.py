"""The ``cpu`` backend: Numba ``njit(parallel=True)`` kernels, tiled online softmax, BLAS tile
products; memory linear in the sequence length. One op per capability: ``forward``, ``backward``,
``decode``, ``varlen`` (packed sequences, and the decode op's packed queries), ``varlen_backward``."""

from __future__ import annotations

from ..base import Backend
from .backward import CpuBackward
from .decode import CpuDecode
from .forward import CpuForward
from .tiles import valid_tiles
from .varlen import CpuVarlen
from .varlen_backward import CpuVarlenBackward

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    name = "cpu"
    description = "Numba njit(parallel=True), tiled online softmax, BLAS tiles; memory linear in L"
    priority = 10
    ops = (CpuForward, CpuBackward, CpuDecode, CpuVarlen, CpuVarlenBackward)

    def capabilities(self) -> dict:
        from ...runtime.gemm_info import gemm_provider_info
        from ...runtime.tuning import tuning_info

        caps = super().capabilities()
        info = gemm_provider_info()
        tuning = tuning_info()
        caps["tuning"] = tuning
        providers = info["providers"]
        caps["gemm"] = info
        caps["notes"] = [
            f"tile products ({info['requested']}): "
            + "; ".join(
                f"{dt} {name}" + ("" if " " in name else f" ({providers[name]})") for dt, name in info["in_use"].items()
            )
            + "; choose with ATTENTION_ENGINE_GEMM or engine.set_gemm_provider",
            _tuning_note(tuning),
        ]
        return caps


def _usable(check, value: dict) -> bool:
    """Whether the engine would use a stored choice (``check`` is the validator it reads it with)."""
    try:
        return bool(check(value))
    except (KeyError, TypeError, ValueError):
        return False


def _tuning_note(tuning: dict) -> str:
    """One line for ``attention-engine list``: the tiles, providers and decode read order measured on
    this machine."""
    from ...runtime.gemm_providers import valid_provider_choice

    if not tuning["enabled"]:
        return "forward tiles and decode read order: the fixed rule (ATTENTION_ENGINE_AUTOTUNE=0)"
    tiles, gemm, order = [], [], []
    for key, value in tuning["choices"].items():
        kind, _, rest = key.partition("/")
        if kind == "cpu-forward-tiles":
            if isinstance(value, dict) and _usable(valid_tiles, value):
                tiles.append(f"{rest} {value['block_q']}x{value['block_k']}/{value['task_rows']}")
        elif kind == "cpu-gemm":  # a stored choice the engine would not use is not listed
            if isinstance(value, dict) and _usable(valid_provider_choice, value):
                gemm.append(f"{rest} {value['provider']}")
        elif kind == "decode-order":
            order.append(f"decode {rest} {'address order' if value.get('sequential') else 'interleaved'}")
    where = tuning["path"] or "memory only (no cache folder)"
    if not tiles and not gemm and not order:
        return f"forward tiles: measured on first large call per class, kept in {where}; none measured yet"
    return (
        "measured on this machine (query x key rows / rows per task): "
        + "; ".join(gemm + tiles + order)
        + f" (kept in {where}; ATTENTION_ENGINE_AUTOTUNE=0 for the fixed rule)"
    )
