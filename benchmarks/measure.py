"""Timing and memory measurement, and the interleaved repetition of competitors.

Peak RSS of one call: the kernel's high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` before the call and read after it, after ``malloc_trim`` has
returned freed memory to the system, so every competitor starts from the same
resident set. Where ``clear_refs`` is not writable (not Linux), a sampling thread
polls the RSS every 5 ms instead.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional

def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc); a no-op elsewhere."""
    from LiverTumorSegLib.allocator import glibc

    gc.collect()
    lib = glibc()
    if lib is not None:
        lib.malloc_trim(0)


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())


def measure(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once: {"result", "seconds", "peak_rss_bytes", "base_rss_bytes"}.

    ``peak_rss_bytes`` is the whole process's peak during the call; subtract
    ``base_rss_bytes`` (the RSS just before) for what the call itself added.
    """
    malloc_trim()
    base = rss_bytes()
    sampler = None
    if not _reset_hwm():
        sampler = _Sampler()
        sampler.start()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    if sampler is None:
        peak = (_status_kib("VmHWM") or 0) * 1024
    else:
        sampler.stop.set()
        sampler.join()
        peak = sampler.peak
    return {"result": result, "seconds": seconds, "peak_rss_bytes": max(peak, base), "base_rss_bytes": base}


def interleaved(competitors: Dict[str, Callable[[], object]], reps: int,
                keep: Optional[Callable[[str, int, object], None]] = None,
                log: Callable[[str], None] = print) -> Dict[str, List[dict]]:
    """Run every competitor ``reps`` times, interleaved (A B C, B C A, C A B, ...).

    The order rotates every repetition so no competitor always runs first (cold caches)
    or always after the same neighbour. ``keep(name, rep, result)`` sees each result
    (to compare outputs); the results themselves are dropped before the next run.
    Returns {name: [{"seconds", "peak_rss_bytes", "base_rss_bytes"}, ...]}.
    """
    names = list(competitors)
    samples: Dict[str, List[dict]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            m = measure(competitors[name])
            if keep is not None:
                keep(name, rep, m["result"])
            del m["result"]
            samples[name].append(m)
            log(f"  rep {rep + 1}/{reps} {name}: {m['seconds']:.2f} s, "
                f"peak +{(m['peak_rss_bytes'] - m['base_rss_bytes']) / 2**20:.0f} MiB")
    return samples


def summary(runs: List[dict]) -> dict:
    """Median wall time and peak RSS (absolute and above the base) of repeated runs."""
    return {
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "seconds_all": [round(r["seconds"], 3) for r in runs],
        "peak_rss_mib": statistics.median(r["peak_rss_bytes"] for r in runs) / 2**20,
        "peak_rss_added_mib": statistics.median(r["peak_rss_bytes"] - r["base_rss_bytes"] for r in runs) / 2**20,
        "reps": len(runs),
    }


class StageTimer:
    """Accumulates wall time per named stage: ``with timer("read"): ...``."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t
                return False

        return _Ctx()
