"""Runs the real command line (``livertumorseg segment ...``) with stage timers attached.

Usage (by :mod:`benchmarks.bench_cli`): ``python benchmarks/cli_child.py REPORT.json ARGS...``
where ARGS are the CLI's own arguments. Timers are wrapped around functions, not
inserted into the engine: the network (to time the forward passes and count patches)
``surfaces_for_labels`` and ``write_outputs`` (which computes the surfaces, so "write"
is its time less the surfaces'). The other stages come from the CLI's own
``stats.json`` timings. The report also holds the time spent
importing the engine and torch before ``main`` ran.
"""

from __future__ import annotations

import json
import sys
import time

T_START = time.perf_counter()

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import LiverTumorSegLib.outputs as outputs  # noqa: E402
import LiverTumorSegLib.pipeline as pipeline  # noqa: E402
import LiverTumorSegLib.surfaces as surfaces  # noqa: E402
from LiverTumorSegLib import cli  # noqa: E402

STATS = {"forward_s": 0.0, "forward_calls": 0, "patches": 0, "surfaces_s": 0.0, "write_outputs_s": 0.0}


class TimedNetwork(torch.nn.Module):
    """Wraps the engine's network; same parameters (so the engine sees the same layout)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.is_cuda:  # time the kernels, not their launch: wait for the work queued before
            torch.cuda.synchronize(x.device)
        t = time.perf_counter()
        out = self.inner(x)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        STATS["forward_s"] += time.perf_counter() - t
        STATS["forward_calls"] += 1
        STATS["patches"] += int(x.shape[0])
        return out


def _install() -> None:
    original_swi = pipeline.sliding_window_inference
    original_surfaces = surfaces.surfaces_for_labels
    original_write = outputs.write_outputs

    def swi(image, network, *args, **kwargs):
        return original_swi(image, TimedNetwork(network), *args, **kwargs)

    def timed_surfaces(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original_surfaces(*args, **kwargs)
        finally:
            STATS["surfaces_s"] += time.perf_counter() - t

    def timed_write(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original_write(*args, **kwargs)
        finally:
            STATS["write_outputs_s"] += time.perf_counter() - t

    pipeline.sliding_window_inference = swi
    outputs.write_outputs = timed_write
    surfaces.surfaces_for_labels = timed_surfaces


def _peak_rss_kib():
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss`` from the parent:
    on Linux that also counts the parent's memory copied at fork, before ``exec``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _gpu_memory() -> dict:
    """Peak GPU memory of this process (PyTorch's allocator), when CUDA was used."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"gpu_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "gpu_peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
            "gpu_name": torch.cuda.get_device_name(0)}


def main() -> int:
    report_path, args = Path(sys.argv[1]), sys.argv[2:]
    _install()
    t_main = time.perf_counter()
    rc = cli.main(args)
    t_end = time.perf_counter()
    out_dir = Path(args[args.index("-o") + 1])
    timings = {}
    stats_json = out_dir / "stats.json"
    if stats_json.is_file():
        timings = json.loads(stats_json.read_text(encoding="utf-8"))["run"]["timings_s"]
    report = dict(STATS, rc=rc, imports_s=t_main - T_START, main_s=t_end - t_main, cli_timings_s=timings,
                  torch_threads=torch.get_num_threads(), peak_rss_kib=_peak_rss_kib(), **_gpu_memory())
    report_path.write_text(json.dumps(report, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
