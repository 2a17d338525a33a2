"""Command line of ``Training/evaluate.py``: choose the cases, run :func:`evaluate_cases`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from LiverTumorSegLib.boxes import WEIGHTINGS, WINDOW_GRIDS

from .dataset import Case, case_id_of, split_cases, test_cases, training_cases
from .errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a model through the LiverTumorSeg engine.")
    p.add_argument("--model", default=None, help="model folder or name (default: the bundled model)")
    p.add_argument("--data-dir", type=Path, default=None, help="MSD Task03-layout folder with dataset.json")
    p.add_argument("--split", choices=("val", "test", "all"), default="val",
                   help="val: the model's validation cases (from its recipe); test: dataset.json 'test' entries "
                        "with labelsTs/ labels; all: every labelled training case (default: %(default)s)")
    p.add_argument("--image", type=Path, default=None, help="evaluate one CT instead of a data set")
    p.add_argument("--label", type=Path, default=None, help="reference labels for --image")
    p.add_argument("--liver-only", action="store_true", help="the reference is a binary liver mask (no tumor labels)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--logs", type=Path, default=None, help="TensorBoard log folder for the loss curves "
                                                             "(default: the run folder named in model.json)")
    p.add_argument("--detection-iou", type=float, default=0.5, help="IoU a lesion match needs (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--overlap", type=float, default=None, help="patch overlap (default: the model's)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=WEIGHTINGS[0],
                   help="how overlapping windows blend, as in 'livertumorseg segment' (default: %(default)s)")
    p.add_argument("--window-grid", choices=WINDOW_GRIDS, default=WINDOW_GRIDS[0],
                   help="where the sliding windows sit, as in 'livertumorseg segment' (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--no-figures", action="store_true", help="metrics only, no plots or overlays")
    return p


def select_cases(args, card) -> List[Case]:
    """The cases the arguments name (a single pair, or a split of a data set)."""
    if args.image is not None and args.data_dir is not None:
        raise ConfigError("give --image and --label (one case) or --data-dir (a data set), not both")
    if args.label is not None and args.image is None:
        raise ConfigError("--label goes with --image (the CT it labels)")
    if args.image is not None:
        if args.label is None:
            raise ConfigError("--image needs --label (the reference to score against)")
        return [Case(case_id_of(args.image), args.image.expanduser().resolve(), args.label.expanduser().resolve())]
    if args.data_dir is None:
        raise ConfigError("give --data-dir (with --split) or --image and --label")
    if args.split == "test":
        cases = [c for c in test_cases(args.data_dir) if c.label is not None]
        if not cases:
            raise ConfigError(f"the test split of {args.data_dir} has no labels (labelsTs/); use --split val or all")
        return cases
    cases = training_cases(args.data_dir)
    if args.split == "all":
        return cases
    data = (card.provenance.get("recipe") or {}).get("data") or {}
    _, val = split_cases(cases, float(data.get("validation_fraction", 0.1)), data.get("folds"),
                         int(data.get("fold", 0)))
    saved = (card.provenance.get("data") or {}).get("validation_cases")
    if saved and [c.case_id for c in val] != list(saved):
        raise ConfigError(
            "the validation split of this data set differs from the one the model was trained with "
            f"(model.json lists {len(saved)} case(s): {', '.join(saved[:5])}...); is --data-dir the training data?")
    return val


def run(argv: Optional[List[str]] = None) -> int:
    """Parse, evaluate, print the means; returns the exit code."""
    from LiverTumorSegLib.model import load_model, resolve_model
    from LiverTumorSegLib.pipeline import SegmentOptions

    from .evaluation import evaluate_cases

    args = build_parser().parse_args(argv)
    loaded = load_model(resolve_model(args.model))
    cases = select_cases(args, loaded.card)
    options = SegmentOptions(device=args.device, precision=args.precision, overlap=args.overlap, threads=args.threads,
                             weighting=args.weighting, window_grid=args.window_grid)
    report = evaluate_cases(loaded, cases, args.out, options=options, liver_only=args.liver_only,
                            iou_threshold=args.detection_iou, logs_dir=args.logs, visuals=not args.no_figures)
    summary = {region: {k: (None if v is None else round(v, 4)) for k, v in values.items()}
               for region, values in report["mean"].items()}
    print(json.dumps({"cases": len(cases), "mean": summary,
                      "detection": report["detection"].get("overall", {})}, indent=2))
    print(f"wrote {Path(args.out).resolve() / 'metrics.json'}")
    return 0
