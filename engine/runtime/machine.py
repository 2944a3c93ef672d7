"""The machine the engine runs on: CPU model, vendor, family/model numbers and ISA flags (from
``/proc/cpuinfo``), core counts, load, versions; and the file name a benchmark's results take.

The one place that reads ``/proc/cpuinfo``: the GEMM providers choose by vendor and flags, the
benchmarks and ``attention-engine`` commands record the machine with every figure.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import time
from importlib import metadata

__all__ = [
    "cpuinfo",
    "cpu_model",
    "cpu_vendor",
    "cpu_flags",
    "cpu_info",
    "cpu_slug",
    "amd_generation",
    "machine_info",
    "result_file_name",
    "ISA_FLAGS",
]

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


@functools.lru_cache(maxsize=None)
def cpuinfo() -> dict:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where there is none)."""
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


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` where ``/proc/cpuinfo`` has none)."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_vendor() -> str:
    """``vendor_id``: ``GenuineIntel``, ``AuthenticAMD``..., or ``""``."""
    return cpuinfo().get("vendor_id", "")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (empty where there are none)."""
    return frozenset(cpuinfo().get("flags", "").split())


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
    """Model name, vendor, family/model/stepping, core count, the ISA flags of :data:`ISA_FLAGS`
    present, and for AMD the core generation (``lscpu`` shows the same numbers)."""
    c = cpuinfo()
    vendor = c.get("vendor_id", platform.processor() or "unknown")
    family, model = int(c.get("cpu family", -1)), int(c.get("model", -1))
    out = {
        "model_name": cpu_model(),
        "vendor": vendor,
        "family": family,
        "model": model,
        "stepping": c.get("stepping"),
        "cpus": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in cpu_flags()],
        "hypervisor": "hypervisor" in cpu_flags(),
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


def result_file_name(what: str, info: dict | None = None, suffix: str = "json") -> str:
    """``<what>-<cpu slug>-<date>.<suffix>``: the name of a benchmark's results (the benchmarks
    under ``bench/`` write them to ``bench/results/``)."""
    return f"{what}-{cpu_slug(info)}-{time.strftime('%Y-%m-%d')}.{suffix}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model, core counts, load average (1, 5, 15 min), OS, Python and library versions, and
    the date (UTC)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("attention-engine", "numpy", "numba", "torch", "scipy")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
