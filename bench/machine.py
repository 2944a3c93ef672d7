"""What machine a benchmark ran on: CPU model, vendor, family/model numbers, the ISA flags that
decide GEMM speed, and a file-name slug for committed results (``bench/results/<what>-<cpu>-<date>``).
"""

from __future__ import annotations

import os
import platform
import re
import time

#: flags that decide which GEMM kernels a library can run
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "avx_vnni",
)


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def amd_generation(family: int, model: int) -> str:
    """AMD's core generation from the CPUID family/model numbers (AMD's published family tables)."""
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen / Zen+"
    if family == 0x19:
        if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF:
            return "Zen 4"
        return "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return f"family {family}"


def cpu_info() -> dict:
    """Model name, vendor, family/model/stepping, core count, ISA flags present, and for AMD the
    core generation (``lscpu`` shows the same numbers)."""
    c = _cpuinfo()
    flags = set(c.get("flags", "").split())
    vendor = c.get("vendor_id", platform.processor() or "unknown")
    family, model = int(c.get("cpu family", -1)), int(c.get("model", -1))
    out = {
        "model_name": c.get("model name", platform.processor() or "unknown"),
        "vendor": vendor,
        "family": family,
        "model": model,
        "stepping": c.get("stepping"),
        "cpus": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "hypervisor": "hypervisor" in flags,
    }
    if vendor == "AuthenticAMD":
        out["generation"] = amd_generation(family, model)
    try:
        out["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    return out


def cpu_slug(info: dict | None = None) -> str:
    """A file-name-safe name: model name, family/model numbers (``amd-epyc-f25-m1``)."""
    info = info or cpu_info()
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*", "", info["model_name"], flags=re.I)
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{name}-f{info['family']}-m{info['model']}"


def result_path(what: str, info: dict | None = None) -> str:
    """``bench/results/<what>-<cpu slug>-<date>.json``."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "results", f"{what}-{cpu_slug(info)}-{time.strftime('%Y-%m-%d')}.json")
