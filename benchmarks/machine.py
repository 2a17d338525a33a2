"""What the benchmarks ran on, and how fast this CPU can multiply at best.

The nominal peak is cores x clock x FLOP per cycle. FLOP per cycle is known only for
CPUs listed in :data:`FLOP_PER_CYCLE` (by vendor, family and AVX-512 support); the
clock is the one the kernel reports (``cpu MHz``), which under a hypervisor is the
base clock, not the boost clock. Because both are assumptions, the suite also measures
a large matrix product in fp32 and bf16 (``gemm_peak``): the rate a well-tuned kernel
actually reaches here, the practical ceiling for convolutions.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Optional

# (vendor, family, has AVX-512) -> (fp32, bf16) FLOP per cycle per core.
# AMD family 25 with AVX-512 is Zen 4: 2 x 256-bit FMA pipes (AVX-512 double-pumped)
# = 32 fp32 FLOP/cycle; VDPBF16PS doubles that for bf16.
FLOP_PER_CYCLE = {("AuthenticAMD", 25, True): (32, 64), ("AuthenticAMD", 26, True): (64, 128)}


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    info.setdefault(key, value)
    except OSError:
        pass
    return info


def describe() -> dict:
    """CPU model, cores, memory, library versions and GPU (if any)."""
    import numpy as np
    import torch

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import psutil

        mem_gib = psutil.virtual_memory().total / 2**30
    except ImportError:  # psutil is in the bench extra, not the test one
        try:
            mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
            mem_gib = None
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("monai", "torchio", "SimpleITK"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    mhz = float(info.get("cpu MHz", "0") or 0)
    fpc = FLOP_PER_CYCLE.get((vendor, family, "avx512f" in flags))
    nominal = None
    if fpc and mhz:
        nominal = {"fp32_gflops": usable * mhz * 1e-3 * fpc[0], "bf16_gflops": usable * mhz * 1e-3 * fpc[1],
                   "assumption": f"{usable} cores x {mhz:.0f} MHz x {fpc[0]} fp32 / {fpc[1]} bf16 FLOP/cycle"}
    return {
        "cpu_model": info.get("model name", platform.processor()),
        "cpu_vendor": vendor, "cpu_family": family, "cpu_model_number": info.get("model"),
        "cpu_mhz_reported": mhz, "logical_cpus_usable": usable,
        "isa": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))),
        "memory_gib": mem_gib, "torch_threads": torch.get_num_threads(),
        "gpu": gpu or "none", "platform": platform.platform(), "versions": versions, "nominal_peak": nominal,
        "load_average_at_start": load_average(),
    }


def load_average() -> list:
    """1, 5 and 15 minute load averages (other jobs on a shared machine), or []."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def gemm_peak(n: int = 2048, reps: int = 3) -> dict:
    """Best GFLOP/s of an n x n x n matrix product in fp32 and bf16 (torch, current threads)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = 2.0 * n ** 3 / best / 1e9
    out["n"] = n
    return out


def one_line(m: dict) -> str:
    """A short description for the table headers."""
    gpu: Optional[str] = m.get("gpu")
    return (f"{m['cpu_model']} ({m['logical_cpus_usable']} CPUs, {m['cpu_mhz_reported']:.0f} MHz reported), "
            f"torch {m['versions']['torch']} with {m['torch_threads']} threads, GPU: {gpu}")
