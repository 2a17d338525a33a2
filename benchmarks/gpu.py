"""Item 5: the GPU (only where PyTorch sees a CUDA device).

* ``device``: the GPU, driver, CUDA and cuDNN versions.
* ``cli``: the item-2 command line (``--device cuda``) on the same phantom, per stage,
  with the host's peak RSS and PyTorch's peak GPU memory (allocated and reserved). The
  first run of a fresh process pays CUDA's start-up and cuDNN's kernel choice, as a
  user's first click does; every run is reported, the median is the headline.
* ``inference``: item 1 on the GPU, interleaved: our engine (fp16 autocast, its
  default on CUDA), MONAI ``sliding_window_inference`` in fp32 (gaussian and constant,
  as on the CPU) and MONAI gaussian under fp16 autocast (the like-for-like precision),
  with each competitor's peak GPU memory and the label Dice against MONAI constant fp32.
* ``training``: the recipe's training step (``default.yaml``: instance-norm U-Net,
  Dice + CE, AdamW, batch 2 of 96³) on synthetic batches, per precision, as steps and
  patches per second after warm-up; then Lightning's ``Trainer.fit`` with the real
  cached data module on phantom cases, timed between the 5th and the last step, so the
  figure includes data loading.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .measure import interleaved, summary


def available() -> bool:
    import torch

    return torch.cuda.is_available()


def describe() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "host_cpus": os.cpu_count()}


def _with_gpu_peak(fn: Callable[[], np.ndarray], peaks: list) -> Callable[[], np.ndarray]:
    """``fn`` with PyTorch's peak GPU memory of each call appended to ``peaks`` (MiB)."""
    import torch

    def run():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        return out
    return run


def inference(model, hu: np.ndarray, overlaps: Sequence[float], reps: int, batch: int = 2, log=print) -> dict:
    """Ours against MONAI on the GPU, interleaved, at each overlap."""
    from LiverTumorSegLib.preprocess import scale_intensity

    from .bench_inference import add_label_agreement
    from .bench_inference import competitors as make_competitors

    x = scale_intensity(hu, model.card.intensity)
    patch = tuple(model.card.patch_size)
    rows = {}
    for overlap in overlaps:
        raw = make_competitors(model, hu, x, overlap, batch, device="cuda")
        gpu_peaks = {name: [] for name in raw}
        competitors = {name: _with_gpu_peak(fn, gpu_peaks[name]) for name, fn in raw.items()}
        for fn in competitors.values():  # warm-up: cuDNN picks its kernels once per shape
            fn()
        kept = {}

        def keep(name, rep, logits):
            if rep == 0:
                kept[name] = logits

        log(f"gpu inference: overlap {overlap:.4f} on {x.shape[::-1]} (x, y, z), {reps} reps")
        runs = interleaved(competitors, reps, keep, log)
        row = {name: dict(summary(samples), gpu_peak_mib=statistics.median(gpu_peaks[name][1:] or gpu_peaks[name]))
               for name, samples in runs.items()}
        add_label_agreement(row, kept, ("ours", "ours_constant", "ours_body_grid", "monai_gaussian",
                                        "monai_gaussian_fp16"))
        t = {name: row[name]["seconds_median"] for name in runs}
        row["ratio_vs_monai"] = t["ours"] / min(t["monai_gaussian"], t["monai_constant"])
        row["ratio_vs_monai_fp16"] = t["ours"] / t["monai_gaussian_fp16"]
        row["gpu_peak_ratio_vs_monai"] = row["ours"]["gpu_peak_mib"] / min(
            row["monai_gaussian"]["gpu_peak_mib"], row["monai_constant"]["gpu_peak_mib"])
        rows[f"{overlap:.4f}"] = row
        kept.clear()
    return {"input_shape_xyz": list(x.shape[::-1]), "patch_size": list(patch), "batch_size": batch,
            "by_overlap": rows, "ratio_vs_monai": max(r["ratio_vs_monai"] for r in rows.values()),
            "ratio_vs_monai_fp16": max(r["ratio_vs_monai_fp16"] for r in rows.values())}


def cli(path: Path, model_dir: Path, reps: int, flops_per_patch: float, log=print) -> dict:
    """The item-2 command line with ``--device cuda``; every run a fresh process."""
    from .bench_cli import run_once, summarise

    threads = os.cpu_count() or 1
    runs = []
    for rep in range(reps):
        r = run_once(path, model_dir, threads, extra=("--device", "cuda"), probe=False)
        log(f"  gpu cli rep {rep + 1}/{reps}: {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"GPU peak {r.get('gpu_peak_allocated_mib', float('nan')):.0f} MiB allocated, "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items()))
        runs.append(r)
    out = summarise(runs, flops_per_patch, {})
    out.pop("probe_bf16_gflops_all", None)
    out.update(input=str(path), threads=threads,
               gpu_peak_allocated_mib_max=max(r.get("gpu_peak_allocated_mib", 0.0) for r in runs),
               gpu_peak_reserved_mib_max=max(r.get("gpu_peak_reserved_mib", 0.0) for r in runs),
               wall_s_first=runs[0]["wall_s"], wall_s_after_first_median=statistics.median(
                   r["wall_s"] for r in runs[1:]) if len(runs) > 1 else None)
    return out


def _step_throughput(config: dict, precision: str, steps: int, warmup: int, log=print) -> dict:
    """Training steps per second of the recipe's module on synthetic batches."""
    import torch

    from livertumorseg_training.module import LiverSegModule

    torch.cuda.empty_cache()  # what an earlier precision's run left cached
    torch.manual_seed(0)
    module = LiverSegModule(config).to("cuda").train()
    opt = torch.optim.AdamW(module.parameters(), lr=float(config["optimizer"]["lr"]))
    b = int(config["trainer"]["batch_size"])
    patch = tuple(int(p) for p in config["sampling"]["patch_size"])
    x = torch.randn((b, 1) + patch, device="cuda")
    y = torch.randint(0, 3, (b,) + patch, device="cuda")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module._loss(module(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = {"precision": precision, "steps": steps, "batch_size": b, "patch_size": list(patch),
           "steps_per_s": steps / seconds, "patches_per_s": steps * b / seconds,
           "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    log(f"  training step ({precision}): {out['steps_per_s']:.2f} steps/s, {out['patches_per_s']:.1f} patches/s, "
        f"GPU peak {out['gpu_peak_mib']:.0f} MiB")
    return out


def _fit_throughput(config: dict, cases: int, steps: int, log=print) -> dict:
    """Lightning ``Trainer.fit`` on phantom cases with the cached data module."""
    import lightning as L
    import torch

    from livertumorseg_training.data import LiverDataModule
    from livertumorseg_training.module import LiverSegModule
    from livertumorseg_training.run import resolve_precision

    from .bench_loader import dataset_folder

    folder = dataset_folder(cases, "full", log=log)
    times = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    # the preprocessing cache goes into a folder removed afterwards, whatever happens
    with tempfile.TemporaryDirectory(prefix="ltsbench-fit-") as scratch:
        work = Path(scratch)
        L.seed_everything(0, workers=True)
        t0 = time.perf_counter()
        datamodule = LiverDataModule(folder, config, work / "cache")
        datamodule.split()
        datamodule.setup("fit")  # builds the preprocessing cache (timed separately)
        cache_s = time.perf_counter() - t0
        module = LiverSegModule(config, datamodule.data_summary())
        precision = resolve_precision(str(config["trainer"]["precision"]), "gpu")
        trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=steps, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[Clock()], use_distributed_sampler=False)
        trainer.fit(module, datamodule=datamodule)
    skip = min(5, len(times) - 2)
    seconds = times[-1] - times[skip]
    n = len(times) - 1 - skip
    b = int(config["trainer"]["batch_size"])
    out = {"cases": cases, "steps_timed": n, "precision": precision, "num_workers": config["sampling"]["num_workers"],
           "steps_per_s": n / seconds, "patches_per_s": n * b / seconds, "cache_build_s": cache_s}
    log(f"  Trainer.fit with the data module: {out['steps_per_s']:.2f} steps/s, {out['patches_per_s']:.1f} "
        f"patches/s ({n} steps, {config['sampling']['num_workers']} workers)")
    return out


def training(quick: bool, log=print) -> dict:
    from .bench_loader import _training_package

    _training_package()
    from livertumorseg_training.config import load_config

    patch = "[48,48,48]" if quick else "[96,96,96]"
    workers = min(8, max((os.cpu_count() or 2) - 2, 1))
    config = load_config("default", [f"sampling.patch_size={patch}", f"sampling.num_workers={workers}"])
    steps, warmup = (5, 2) if quick else (30, 5)
    out = {"recipe": "default.yaml", "synthetic": [
        _step_throughput(config, p, steps, warmup, log) for p in ("32-true", "bf16-mixed", "16-mixed")]}
    out["fit"] = _fit_throughput(config, 3 if quick else 6, 12 if quick else 60, log)
    return out


PARTS = ("cli", "inference", "training")


def run(model, hu: np.ndarray, overlaps: Sequence[float], reps: int, cli_input: Path, cli_dir: Path,
        flops_per_patch: float, quick: bool, log=print, partial=None, parts: Sequence[str] = PARTS) -> dict:
    """The GPU section (the ``parts`` asked for); ``partial(section)`` after each part."""
    out = {"status": "measured", "device": describe()}
    log(f"gpu: {out['device']['name']}")
    for name, fn in (("cli", lambda: cli(cli_input, cli_dir, reps + 1, flops_per_patch, log)),
                     ("inference", lambda: inference(model, hu, overlaps, reps, log=log)),
                     ("training", lambda: training(quick, log))):
        if name not in parts:
            continue
        try:
            out[name] = fn()
        except Exception as exc:  # keep what the other parts measured; say what failed
            out[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
            log(f"gpu {name} failed: {exc!r}")
        if partial is not None:
            partial(out)
    return out
