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


def _read_keys() -> tuple[set, set, set]:
    """The tuning keys (after their kind) the engine reads: providers, tiles, decode orders."""
    from ...runtime.gemm_providers import OWN_TILES, PROVIDERS, provider_key

    floats = ("float32", "float64")
    gemm = {provider_key(dt, w).partition("/")[2] for dt in floats for w in (64, 128)}
    tiles = {
        f"{p}/{dt}/w{w}/{n}"
        for p in PROVIDERS + OWN_TILES
        for dt in floats + ("bfloat16", "float16")
        for w in (64, 128)
        for n in ("short", "medium", "long")
    }
    return gemm, tiles, set(floats)


def _tuning_note(tuning: dict) -> str:
    """One line for ``attention-engine list``: the tiles, providers and decode read order measured on
    this machine. A stored entry the engine would not read (an unknown key, a value its validator
    refuses: a file edited by hand, or written by another version) is not listed."""
    from ...runtime.gemm_providers import gemm_mode, valid_provider_choice

    if not tuning["enabled"]:
        return "forward tiles and decode read order: the fixed rule (ATTENTION_ENGINE_AUTOTUNE=0)"
    gemm_keys, tile_keys, order_keys = _read_keys()
    tiles, gemm, order = [], [], []
    for key, value in tuning["choices"].items():
        kind, _, rest = key.partition("/")
        if not isinstance(value, dict):
            continue
        if kind == "cpu-forward-tiles" and rest in tile_keys and _usable(valid_tiles, value):
            tiles.append(f"{rest} {value['block_q']}x{value['block_k']}/{value['task_rows']}")
        elif kind == "cpu-gemm" and rest in gemm_keys and _usable(valid_provider_choice, value):
            gemm.append(f"{rest} {value['provider']}")
        elif kind == "decode-order" and rest in order_keys and isinstance(value.get("sequential"), bool):
            order.append(f"decode {rest} {'address order' if value['sequential'] else 'interleaved'}")
    where = tuning["path"] or "memory only (no cache folder)"
    if gemm and gemm_mode() != "auto":  # measured for "auto": not what a forced provider uses
        gemm = [f"providers measured for auto ({gemm_mode()} requested now) " + ", ".join(gemm)]
    if not tiles and not gemm and not order:
        return f"forward tiles: measured on first large call per class, kept in {where}; none measured yet"
    return (
        "measured on this machine (query x key rows / rows per task): "
        + "; ".join(gemm + tiles + order)
        + f" (kept in {where}; ATTENTION_ENGINE_AUTOTUNE=0 for the fixed rule)"
    )
