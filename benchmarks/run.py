"""LiverTumorSeg benchmark suite.

    python benchmarks/run.py [--quick] [--json OUT.json] [--markdown OUT.md] [--weights MODEL_DIR]
                             [--only inference,ablation,cli,scaling,loader,accuracy] [--reps N]

Prints Markdown tables and writes every figure to JSON, with the machine described.
Sections: ``inference`` (item 1: ours vs MONAI vs TorchIO), ``ablation`` (forward pass
per optimisation), ``cli`` (item 2: the command line per stage), ``scaling`` (item 3),
``loader`` (item 4: training patches per second), ``accuracy`` (Dice per engine
configuration), ``gpu`` (item 5: only with a CUDA GPU). Comparisons run their
competitors interleaved in this one process and report medians of ``--reps`` runs.

``--quick`` (under 3 minutes on 2 CPU cores; the CI smoke test) runs every section that
feeds a ratio on small inputs with 48-voxel patches, one run per CLI/scaling size, and
skips ``accuracy``. Its figures show that the suite works; they do not measure the
targets (tiny inputs, where start-up and per-patch overheads dominate). Without trained
benchmark weights it uses a seeded untrained network and says so (``model.weights``);
a full run trains them first (15 to 40 minutes on 2 shared cores; see
benchmarks/weights.py) unless ``--weights`` names a model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ablation, accuracy, bench_cli, bench_inference, bench_loader, gpu  # noqa: E402
from benchmarks import inputs, machine, report, weights  # noqa: E402
from benchmarks.flops import forward_flops  # noqa: E402

SECTIONS = ("inference", "ablation", "cli", "scaling", "loader", "accuracy", "gpu")
REQUIRED_KEYS = (
    "machine.cpu_model", "machine.logical_cpus_usable", "machine.versions.torch", "machine.gpu",
    "model.weights", "inference.ratio_vs_monai", "inference.ratio_vs_torchio", "inference.rss_ratio_vs_monai",
    "inference.min_label_dice_vs_monai_constant", "inference.min_label_dice_constant_vs_monai_constant",
    "inference.min_label_dice_vs_monai_same_weighting", "inference.ratio_vs_monai_same_allocator",
    "inference.body_grid.ratio_vs_monai", "inference.body_grid.ratio_vs_torchio",
    "inference.body_grid.rss_ratio_vs_monai", "inference.min_label_dice_body_grid_vs_monai_constant",
    "ablation.rows", "cli.wall_s_median", "cli.peak_rss_mib_median",
    "cli.stages_s_median", "cli.forward_share_of_inference", "cli.gflops_forward",
    "cli.variants.cover_grid.wall_s_median", "cli.variants.cover_grid.peak_rss_mib_median",
    "cli.variants.body_grid.wall_s_median", "cli.variants.body_grid.peak_rss_mib_median",
    "cli.variants.no_memory_reuse.wall_s_median", "scaling.exponent_wall",
    "scaling.exponent_inference", "loader.speedup", "gpu.status", "targets",
)
FULL = {"infer_shape": (256, 256, 200), "overlaps": (8 / 96, 0.25, 0.5), "patch": None, "cli_shape": (512, 512, 300),
        "cli_spacing": (0.8, 0.8, 1.5), "scaling": [(128, 128, 128), (256, 256, 128), (256, 256, 256),
                                                   (512, 512, 150), (512, 512, 300), (512, 512, 600)],
        "scaling_spacing": (0.8, 0.8, 1.5), "cli_reps": 3, "scaling_reps": 1, "ablation_batch": 2,
        "loader": (6, "full", 2, ()),
        "phantoms": 3}
QUICK = {"infer_shape": (64, 64, 48), "overlaps": (8 / 96,), "patch": (48, 48, 48), "cli_shape": (48, 48, 32),
         "cli_spacing": (2.0, 2.0, 3.0), "scaling": [(32, 32, 24), (48, 48, 32), (64, 64, 48)],
         "scaling_spacing": (2.0, 2.0, 3.0), "cli_reps": 1, "scaling_reps": 1, "ablation_batch": 1,
         "loader": (3, "coarse", 0, ("sampling.patch_size=[32,32,32]", "sampling.samples_per_volume=2",
                                     "sampling.queue_length=4", "data.crop_or_pad=[96,96,96]")), "phantoms": 0}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_bench_model(args, quick: bool, patch, scratch: Path):
    """(LoadedModel, model folder for the CLI, description of the weights); a model the
    CLI cannot read from where it came is saved under ``scratch``."""
    from LiverTumorSegLib.model import load_model, save_model

    folder = Path(args.weights).expanduser() if args.weights else weights.weights_dir()
    if weights.usable(folder, explicit=bool(args.weights)):
        model, what = load_model(folder), f"trained: {folder}"
    elif quick:
        model, what = weights.random_model(patch or weights.PATCH), "random-init (quick; trained weights not found)"
    else:
        model, what = load_model(weights.ensure_weights(args.weights, log=log)), f"trained: {folder}"
    if patch and tuple(model.card.patch_size) != tuple(patch):
        model = dataclasses.replace(model, card=dataclasses.replace(model.card, patch_size=tuple(patch)))
    if patch or not what.startswith("trained"):
        cli_dir = Path(scratch) / "model"
        save_model(cli_dir, model.network, dataclasses.replace(model.card))
    else:
        cli_dir = folder
    return model, cli_dir, what


def git_state() -> dict:
    """Commit of the checkout and whether tracked files differ from it."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": commit or None, "modified_tracked_files": [line[3:] for line in dirty if line.strip()]}


def targets(res: dict) -> dict:
    def get(path):
        node = res
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def t(path, goal, ok):
        value = get(path)
        return {"value": value, "target": goal, "met": None if value is None else bool(ok(value))}

    def most(path, bound, goal=None):
        return t(path, goal or f"<= {bound:g}", lambda v: v <= bound)

    def least(path, bound, goal=None):
        return t(path, goal or f">= {bound:g}", lambda v: v >= bound)

    rss = "<= 1 (peak RSS added)"
    return {
        "inference.ratio_vs_monai": most("inference.ratio_vs_monai", 0.5),
        "inference.ratio_vs_torchio": most("inference.ratio_vs_torchio", 0.5),
        "inference.rss_ratio_vs_monai": most("inference.rss_ratio_vs_monai", 1.0, rss),
        "inference.label Dice vs MONAI constant fp32 (ours, constant weighting)": least(
            "inference.min_label_dice_constant_vs_monai_constant", 0.998),
        "inference.label Dice vs MONAI constant fp32 (ours, default Gaussian)": least(
            "inference.min_label_dice_vs_monai_constant", 0.998),
        "inference.label Dice vs MONAI Gaussian fp32 (ours, default Gaussian: same weighting)": least(
            "inference.min_label_dice_vs_monai_same_weighting", 0.998),
        "inference (--window-grid body).ratio_vs_monai": most("inference.body_grid.ratio_vs_monai", 0.5),
        "inference (--window-grid body).ratio_vs_torchio": most("inference.body_grid.ratio_vs_torchio", 0.5),
        "inference (--window-grid body).rss_ratio_vs_monai": most("inference.body_grid.rss_ratio_vs_monai", 1.0, rss),
        "inference (--window-grid body).label Dice vs MONAI constant fp32": least(
            "inference.min_label_dice_body_grid_vs_monai_constant", 0.998),
        "cli.wall_s": most("cli.wall_s_median", 60, "<= 60 s"),
        "cli.wall_s (--window-grid cover)": most("cli.variants.cover_grid.wall_s_median", 60, "<= 60 s"),
        "cli.wall_s (--window-grid body)": most("cli.variants.body_grid.wall_s_median", 60, "<= 60 s"),
        "cli.peak_rss": most("cli.peak_rss_mib_median", 3e9 / 2**20, "<= 3 GB (2861 MiB)"),
        "cli.forward_share": least("cli.forward_share_of_inference", 0.9, ">= 0.90"),
        "scaling.exponent_wall": most("scaling.exponent_wall", 1.1, "about 1 (linear)"),
        "loader.speedup": least("loader.speedup", 5),
        "accuracy.max Dice move (default)": most("accuracy.max_dice_move_vs_fp32_nocrop.default", 0.002),
        "accuracy.max Dice move (--window-grid cover)": most("accuracy.max_dice_move_vs_fp32_nocrop.cover_grid", 0.002),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, under 3 minutes (CI smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    parser.add_argument("--weights", default=None, help="benchmark model folder (default: the cache; made if missing)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per comparison (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the ablation")
    parser.add_argument("--onnx", action="store_true",
                        help="add ONNX Runtime (fp32, CPU provider) to the ablation; needs onnx and onnxruntime")
    parser.add_argument("--no-exactness", action="store_true",
                        help="item 1: skip the fp32 uncropped exactness runs (two extra runs at the first overlap)")
    parser.add_argument("--gpu-parts", default=",".join(gpu.PARTS), help="GPU section parts: cli,inference,training")
    parser.add_argument("--overlaps", default=None,
                        help="comma-separated overlaps for item 1 (default: the seed's 8/96, 0.25, 0.5; quick: 8/96)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ltsbench-model-") as scratch:  # removed when done, or on failure
        return run_sections(args, argv, Path(scratch))


def run_sections(args, argv, scratch: Path) -> int:
    """The sections ``args`` selects; a model saved for the CLI runs goes into ``scratch``."""
    import torch

    torch.set_num_threads(args.threads)
    # Every in-process competitor, before and after the engine's first patch loop, runs
    # under the glibc settings that loop leaves behind (LiverTumorSegLib.allocator).
    from LiverTumorSegLib.allocator import outside_settings

    glibc_settled = outside_settings()
    cfg = dict(QUICK if args.quick else FULL)
    if args.overlaps:
        cfg["overlaps"] = tuple(float(v) for v in args.overlaps.split(","))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    t0 = time.perf_counter()
    res = {"command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_state(),
           "machine": dict(machine.describe(), gemm_peak=machine.gemm_peak(1024 if args.quick else 2048)),
           "glibc_malloc_settled": glibc_settled}
    log(machine.one_line(res["machine"]))
    model, cli_dir, what = load_bench_model(args, args.quick, cfg["patch"], scratch)
    res["model"] = {"weights": what, "card": model.card.name, "patch_size": list(model.card.patch_size),
                    "widths": model.card.architecture.get("widths"), "spacing_mm": list(model.card.spacing_mm),
                    "provenance": model.card.provenance}
    flop = forward_flops(model.network, model.card.patch_size)
    peaks = {"nominal_bf16_peak": (res["machine"]["nominal_peak"] or {}).get("bf16_gflops"),
             "measured_bf16_gemm": res["machine"]["gemm_peak"]["bf16_gflops"]}
    hu = None
    if "inference" in only or "ablation" in only:  # the GPU section makes its own when run alone
        hu, _ = inputs.model_grid_phantom(cfg["infer_shape"])

    def save(section=None, value=None):
        """Write the figures so far (a long run keeps what it measured if stopped)."""
        if section is not None:
            res[section] = value
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")

    # Shorter sections first; the long interleaved inference comparison last.
    if "ablation" in only:
        log("ablation: forward pass per variant")
        save("ablation", ablation.run(model, hu, args.reps, batch=cfg["ablation_batch"],
                                      compile_too=args.compile, onnx_too=args.onnx, log=log))
    if "cli" in only:
        path = inputs.phantom_file(cfg["cli_shape"], cfg["cli_spacing"], log=log)
        log(f"cli: {path.name}, {cfg['cli_reps']} runs")
        save("cli", bench_cli.run(path, cli_dir, cfg["cli_reps"], args.threads, flop, peaks, log))
    if "scaling" in only:
        files = [(s, inputs.phantom_file(s, cfg["scaling_spacing"], log=log)) for s in cfg["scaling"]]
        log(f"scaling: {len(files)} sizes at {cfg['scaling_spacing']} mm")
        save("scaling", dict(bench_cli.scaling(files, cli_dir, cfg["scaling_reps"], args.threads, log),
                             spacing_mm=list(cfg["scaling_spacing"])))
    if "loader" in only:
        cases, preset, workers, overrides = cfg["loader"]
        log(f"loader: {cases} {preset} phantom cases")
        save("loader", bench_loader.run_variants(cases, preset, args.reps, workers, overrides, log))
    if "accuracy" in only:
        if args.quick:
            save("accuracy", {"status": "skipped in --quick"})
        else:
            log("accuracy: Dice per engine configuration")
            save("accuracy", accuracy.run(model, cfg["phantoms"], real=True, log=log))
    if "inference" in only:
        save("inference", bench_inference.run(model, hu, cfg["overlaps"], args.reps, log=log,
                                              check_exactness=not args.no_exactness,
                                              partial=lambda sec: save("inference", sec)))
    if "gpu" in only:  # last: it moves the shared network to the GPU
        if not gpu.available():
            save("gpu", {"status": "not measured: PyTorch sees no CUDA GPU on this machine"})
        else:
            parts = [p.strip() for p in args.gpu_parts.split(",") if p.strip()]
            if hu is None and "inference" in parts:
                hu, _ = inputs.model_grid_phantom(cfg["infer_shape"])
            path = inputs.phantom_file(cfg["cli_shape"], cfg["cli_spacing"], log=log) if "cli" in parts else None
            save("gpu", gpu.run(model, hu, cfg["overlaps"], args.reps, path, cli_dir, flop, args.quick, log=log,
                                partial=lambda sec: save("gpu", sec), parts=parts))
    else:
        res["gpu"] = {"status": "not measured: section not selected (--only)"}
    res["targets"] = targets(res)
    res["load_average_at_end"] = machine.load_average()
    res["total_s"] = time.perf_counter() - t0
    text = render(res)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        save()
        log(f"wrote {args.json}")
    return 0


def render(res: dict) -> str:
    parts = [f"Command: `{res['command']}` ({res['total_s'] / 60:.1f} min, started {res['started']}, "
             f"commit {(res.get('git') or {}).get('commit') or '?'})",
             f"Model: {res['model']['weights']}; patch {res['model']['patch_size']}",
             report.machine(res["machine"])]
    for name, title in (("inference", "1. Sliding-window inference"), ("ablation", "Forward-pass ablation"),
                        ("cli", "2. Whole command line"), ("scaling", "3. Scaling"),
                        ("loader", "4. Training data pipeline"), ("accuracy", "Accuracy per configuration")):
        if name in res and ("status" not in res[name] or name == "loader"):
            parts.append(f"### {title}\n\n" + getattr(report, name)(res[name]))
        elif name in res:
            parts.append(f"### {title}\n\n{res[name]['status']}")
    parts.append("### 5. GPU\n\n" + report.gpu(res["gpu"]))
    parts.append("### Targets\n\n" + report.targets(res["targets"]))
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
