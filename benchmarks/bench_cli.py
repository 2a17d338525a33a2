"""Items 2 and 3: the whole command line on a CT file, per stage; and its scaling.

Each run is a fresh process (``benchmarks/cli_child.py`` around ``livertumorseg
segment``), so its peak RSS (the child's own ``VmHWM``, read as it exits) is the
command's own, and its wall time includes starting Python and importing torch, as a
user sees it.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from LiverTumorSegLib.allocator import ENV_SWITCH

STAGES = ("read", "preprocess", "inference", "postprocess", "statistics", "surfaces", "write")
CHILD = Path(__file__).resolve().parent / "cli_child.py"


def run_once(input_path: Path, model_dir: Path, threads: int, extra: Sequence[str] = (), probe: bool = True,
             env_extra: Optional[dict] = None) -> dict:
    """One ``livertumorseg segment`` run: wall time, peak RSS and the child's stage report.

    ``probe_bf16_gflops``: a 1024-cube bf16 matrix product timed just before the run, a
    gauge of how much of the CPU other jobs left to this one.
    """
    import json

    from .machine import gemm_peak

    probe = gemm_peak(1024, reps=3)["bf16_gflops"] if probe else None
    work = Path(tempfile.mkdtemp(prefix="ltsbench-cli-"))
    try:
        report = work / "report.json"
        cmd = [sys.executable, str(CHILD), str(report), "segment", str(input_path), "-o", str(work / "out"),
               "--model", str(model_dir), "--progress", "none", "--threads", str(threads), *extra]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", ENV_SWITCH: "1", **(env_extra or {})}
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode != 0 or not report.is_file():
            raise RuntimeError(f"CLI run failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")
        child = json.loads(report.read_text(encoding="utf-8"))
        outputs = sorted(p.name for p in (work / "out").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cli_t = child["cli_timings_s"]
    stages = {k: float(cli_t.get(k, 0.0)) for k in STAGES if k in cli_t}
    stages["surfaces"] = child["surfaces_s"]
    stages["write"] = child["write_outputs_s"] - child["surfaces_s"]
    stages["startup"] = wall - sum(stages.values())
    return {"wall_s": wall, "peak_rss_mib": child["peak_rss_kib"] / 1024.0, "stages_s": stages,
            "forward_s": child["forward_s"], "patches": child["patches"], "outputs": outputs,
            "stdout": stdout.strip().splitlines()[:1], "probe_bf16_gflops": probe,
            **{k: v for k, v in child.items() if k.startswith("gpu_")}}


def summarise(runs: List[dict], flops_per_patch: float, peaks: dict) -> dict:
    """Medians over runs, forward share and achieved GFLOP/s."""
    med = statistics.median
    stages = {k: med(r["stages_s"][k] for r in runs) for k in runs[0]["stages_s"]}
    inference = stages.get("inference", 0.0)
    forward = med(r["forward_s"] for r in runs)
    patches = runs[0]["patches"]
    flop = patches * flops_per_patch
    out = {
        "wall_s_median": med(r["wall_s"] for r in runs), "wall_s_all": [round(r["wall_s"], 2) for r in runs],
        "peak_rss_mib_median": med(r["peak_rss_mib"] for r in runs),
        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
        "stages_s_median": stages, "forward_s_median": forward, "patches": patches,
        "forward_share_of_inference": forward / inference if inference else None,
        "gflop": flop / 1e9,
        "gflops_forward": flop / forward / 1e9 if forward else None,
        "gflops_inference": flop / inference / 1e9 if inference else None,
        "outputs": runs[0]["outputs"], "summary_line": runs[0]["stdout"], "reps": len(runs),
        "probe_bf16_gflops_all": [round(r["probe_bf16_gflops"]) for r in runs if r["probe_bf16_gflops"] is not None],
    }
    for name, value in (peaks or {}).items():
        if value and out["gflops_forward"]:
            out[f"fraction_of_{name}"] = out["gflops_forward"] / value
    return out


# Timed beside the default, same reps: name -> (extra CLI arguments, extra environment).
VARIANTS = {"cover_grid": (("--window-grid", "cover"), {}),
            "body_grid": (("--window-grid", "body"), {}),
            "no_memory_reuse": ((), {ENV_SWITCH: "0"})}  # ablation of LiverTumorSegLib.allocator


def run(input_path: Path, model_dir: Path, reps: int, threads: int, flops_per_patch: float,
        peaks: dict, log=print, variants: dict = VARIANTS) -> dict:
    """Item 2: ``reps`` runs of the CLI on one input, each followed by one run per
    variant (``name -> (extra arguments, extra environment)``), reported under ``variants``."""
    by_name: dict = {None: [], **{name: [] for name in variants}}  # None: the default command line
    for rep in range(reps):
        for name, (extra, env_extra) in [(None, ((), {}))] + list(variants.items()):
            r = run_once(input_path, model_dir, threads, extra, env_extra=env_extra)
            by_name[name].append(r)
            log(f"  cli rep {rep + 1}/{reps}{' ' + name if name else ''}: {r['wall_s']:.1f} s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB, probe {r['probe_bf16_gflops']:.0f} GFLOP/s, "
                + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items()))
    out = summarise(by_name.pop(None), flops_per_patch, peaks)
    out["input"] = str(input_path)
    out["variants"] = {name: dict(summarise(rs, flops_per_patch, peaks), arguments=list(variants[name][0]),
                                  environment=dict(variants[name][1]))
                       for name, rs in by_name.items()}
    return out


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(v, 1e-9)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")


def scaling(inputs: Sequence[tuple], model_dir: Path, reps: int, threads: int, log=print) -> dict:
    """Item 3: time and peak memory per input size; fitted exponents against voxels.

    ``inputs``: (shape_xyz, path) pairs. Runs are interleaved across sizes (size order
    rotates per repetition) so slow spells on a shared machine hit every size alike.
    """
    per = {tuple(s): [] for s, _ in inputs}
    for rep in range(reps):
        order = list(inputs[rep % len(inputs):]) + list(inputs[:rep % len(inputs)])
        for shape, path in order:
            r = run_once(path, model_dir, threads)
            per[tuple(shape)].append(r)
            log(f"  scaling rep {rep + 1}/{reps} {'x'.join(map(str, shape))}: {r['wall_s']:.1f} s, "
                f"inference {r['stages_s']['inference']:.1f} s, peak {r['peak_rss_mib']:.0f} MiB")
    rows = []
    med = statistics.median
    for shape, _ in inputs:
        runs = per[tuple(shape)]
        rows.append({
            "shape_xyz": list(shape), "voxels": int(math.prod(shape)),
            "wall_s": med(r["wall_s"] for r in runs),
            "engine_s": med(r["wall_s"] - r["stages_s"]["startup"] for r in runs),
            "inference_s": med(r["stages_s"]["inference"] for r in runs),
            "patches": runs[0]["patches"], "peak_rss_mib": med(r["peak_rss_mib"] for r in runs),
            "stages_s": {k: med(r["stages_s"][k] for r in runs) for k in runs[0]["stages_s"]},
            "probe_bf16_gflops_all": [round(r["probe_bf16_gflops"]) for r in runs],
        })
    voxels = [r["voxels"] for r in rows]
    return {
        "rows": rows, "reps": reps,
        "exponent_wall": fit_exponent(voxels, [r["wall_s"] for r in rows]),
        "exponent_engine": fit_exponent(voxels, [r["engine_s"] for r in rows]),
        "exponent_inference": fit_exponent(voxels, [r["inference_s"] for r in rows]),
        "exponent_peak_rss": fit_exponent(voxels, [r["peak_rss_mib"] for r in rows]),
        "exponent_non_inference": fit_exponent(voxels, [r["engine_s"] - r["inference_s"] for r in rows]),
    }
