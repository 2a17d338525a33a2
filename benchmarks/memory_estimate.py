"""Is the engine's memory estimate conservative? Measured peak RSS against the estimate.

``python -m benchmarks.memory_estimate [--quick] [--json OUT.json]``

Each configuration is one ``livertumorseg segment`` run in a fresh process (as items 2
and 3 run it: :func:`benchmarks.bench_cli.run_once`, peak RSS = the child's own
``VmHWM``), next to the estimate that the engine checks against the budget before it
reads the voxels (:meth:`LiverTumorSegLib.pipeline.Segmenter.check_memory`, from the
file's header). Models: the bundled demo model (widths 8-64, 48³ patches, 3 mm), the
seed-width benchmark model (32-256, 96³, 1.5 mm; :mod:`benchmarks.weights`, or an
untrained one of the same shape when those weights are not cached: memory does not
depend on the weights' values) and an untrained seed-architecture model at widths 4-8
with 64³ patches at 1.5 mm, for a very large input where the volume's arrays are nearly
all of the memory. ``--quick`` runs
the small inputs only. The estimate must not fall below the peak; how far above it
lies is the price of being safe.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def configurations(quick: bool) -> list:
    """(name, model key, input (shape xyz, spacing), extra CLI arguments)."""
    small = ((256, 256, 128), (0.8, 0.8, 1.5))  # 8 windows for either model: batches up to 8 fill
    out = [("demo, default precision, batch 2", "demo", small, []),
           ("demo, fp32, batch 2", "demo", small, ["--precision", "fp32"]),
           ("demo, fp32, batch 8", "demo", small, ["--precision", "fp32", "--batch-size", "8"]),
           ("seed width, default precision, batch 1", "bench", small, ["--batch-size", "1"]),
           ("seed width, default precision, batch 2", "bench", small, []),
           ("seed width, fp32, batch 1", "bench", small, ["--precision", "fp32", "--batch-size", "1"]),
           ("seed width, fp32, batch 2", "bench", small, ["--precision", "fp32"]),
           ("seed width, fp32, batch 4", "bench", small, ["--precision", "fp32", "--batch-size", "4"])]
    if not quick:
        out += [("seed width, default precision, 512x512x300", "bench", ((512, 512, 300), (0.8, 0.8, 1.5)), []),
                ("widths 4-8, --fast, 512x512x1000 at 0.5 mm", "tiny", ((512, 512, 1000), (0.8, 0.8, 0.5)),
                 ["--fast"])]
    return out


def untrained_model(folder: Path, widths, patch) -> Path:
    """A seeded, untrained seed-architecture model folder at 1.5 mm."""
    import torch

    from LiverTumorSegLib.model import ModelCard, save_model
    from LiverTumorSegLib.model.unet import UNet3D

    torch.manual_seed(0)
    card = ModelCard(name=f"memory-untrained-w{widths[0]}", architecture={
                         "type": "unet3d", "in_channels": 1, "num_classes": 3, "widths": list(widths), "norm": "none"},
                     labels={"0": "background", "1": "liver", "2": "tumor"}, spacing_mm=(1.5, 1.5, 1.5),
                     patch_size=tuple(patch), weights_file="weights.pt", weights_sha256="")
    save_model(folder, UNet3D(widths=tuple(widths)).eval(), card)
    return folder


def _row(name: str, model: Path, shape, spacing, extra, threads: int) -> dict:
    from LiverTumorSegLib.io import read_header
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    from .bench_cli import run_once
    from .inputs import phantom_file

    path = phantom_file(shape, spacing)
    batch = int(extra[extra.index("--batch-size") + 1]) if "--batch-size" in extra else 2
    options = SegmentOptions(device="cpu", precision="fp32" if "fp32" in extra else "auto", batch_size=batch,
                             fast="--fast" in extra)
    estimate = Segmenter(model, options).check_memory(*read_header(path, with_direction=True)) / 2**20
    run = run_once(path, model, threads, ["--device", "cpu", *extra], probe=False)
    row = {"configuration": name, "input_xyz": list(shape), "spacing_mm": list(spacing), "args": list(extra),
           "peak_rss_mib": round(run["peak_rss_mib"], 1), "estimate_mib": round(estimate, 1),
           "estimate_over_peak": round(estimate / run["peak_rss_mib"], 3)}
    print(f"| {name} | {'×'.join(map(str, shape))} | {row['peak_rss_mib']:,.0f} | {row['estimate_mib']:,.0f} "
          f"| {row['estimate_over_peak']:.2f} |", flush=True)
    return row


def main(argv=None) -> int:
    from LiverTumorSegLib.model import DEFAULT_MODEL, resolve_model

    from .weights import PATCH, WIDTHS, usable, weights_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs only (about a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ltsbench-memory-") as scratch:
        configs = configurations(args.quick)
        trained = usable(weights_dir())
        models = {"demo": Path(resolve_model(DEFAULT_MODEL)),
                  "bench": weights_dir() if trained else untrained_model(Path(scratch) / "bench", WIDTHS, PATCH)}
        if any(key == "tiny" for _, key, _, _ in configs):
            models["tiny"] = untrained_model(Path(scratch) / "tiny", (4, 8), (64, 64, 64))
        print(f"seed width: {'the cached benchmark weights' if trained else 'untrained (no cached benchmark weights)'}\n")
        print("| configuration | input (x, y, z) | peak RSS MiB | estimate MiB | estimate / peak |")
        print("|---|---|---|---|---|")
        rows = [_row(name, models[key], shape, spacing, extra, args.threads) for name, key, (shape, spacing), extra in configs]
    low = [r["configuration"] for r in rows if r["estimate_over_peak"] < 1.0]
    print(f"\nestimate below the measured peak: {', '.join(low) if low else 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "estimate_below_peak": low}, indent=2) + "\n")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
