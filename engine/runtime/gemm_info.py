"""What ``attention-engine list`` and the benchmarks report about the GEMM providers
(``engine.runtime.gemm_providers``): every provider's status, the one in use per dtype (16-bit
paths included) and the calibration's times."""

from __future__ import annotations

from .gemm_providers import (
    PROVIDERS,
    auto_order,
    calibration_times,
    gemm_mode,
    get_gemm_provider,
    load_provider,
    provider_key,
    sixteen_bit_gemm,
    sixteen_bit_tiles,
    valid_provider_choice,
)
from .tuning import lookup

__all__ = ["available_gemm_providers", "gemm_provider_info"]


def available_gemm_providers() -> dict[str, str]:
    """Every provider: its version string when it loads here, else why it does not."""
    out = {}
    for name in PROVIDERS:
        got = load_provider(name)
        out[name] = got if isinstance(got, str) else got.version
    return out


def gemm_provider_info() -> dict:
    """What ``attention-engine list`` shows: how the provider is chosen, the one in use per dtype
    (running the calibration if it has not run; heads over 64 apart where their measured provider
    differs), the calibration's times, and every provider's status (version, or why it cannot
    load)."""
    in_use = {dt: get_gemm_provider(dt).name for dt in ("float32", "float64")}
    measured = {
        dt: got["provider"]
        for dt in ("float32", "float64")
        if (got := lookup(provider_key(dt), valid_provider_choice)) is not None
    }
    for dt in ("float32", "float64"):  # heads wider than 64, where measured apart (autotune)
        if (got := lookup(provider_key(dt, 128), valid_provider_choice)) is not None:
            measured[f"{dt}, heads over 64"] = got["provider"]
            wide = get_gemm_provider(dt, 128).name
            if wide != in_use[dt]:
                in_use[f"{dt}, heads over 64"] = wide
    widened = in_use["float32"]
    if "float32, heads over 64" in in_use:
        widened += f", heads over 64 {in_use['float32, heads over 64']}"
    for dt in ("bfloat16", "float16"):
        half = sixteen_bit_gemm(dt)
        in_use[dt] = f"{half.name} (16-bit GEMM)" if half else f"{widened} (widened to float32)"
        own = sixteen_bit_tiles(dt)[1]
        if own:
            what = "AMX tiles" if own == "amx" else "VDPBF16PS"
            in_use[dt] = f"{own} ({what}) without dropout, else {in_use[dt]}"
    return {
        "requested": gemm_mode(),
        "auto_order": list(auto_order()),
        "measured": measured,
        "in_use": in_use,
        "calibration_us": calibration_times(),
        "providers": available_gemm_providers(),
    }
