"""Honest evaluation: each CT goes through the engine exactly as the command line runs it.

:func:`evaluate_cases` reads every case with ``LiverTumorSegLib.io.read_volume``,
segments it with ``LiverTumorSegLib.pipeline.Segmenter`` (preprocessing, sliding
window, postprocessing, labels back on the CT's own grid) and scores the labels against
the reference on that grid. Outputs in ``OUT``: ``metrics.json`` (per case, means such
as ``mean.liver.dice``, lesion detection), ``metrics.csv``, ``predictions/``, plots and
overlays of the best and worst cases.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from .dataset import Case
from .errors import DatasetError
from .metrics import detection_summary, lesion_detection, mean_of, overlap_metrics

REGIONS = ("liver", "tumor")
METRIC_KEYS = ("dice", "iou", "hd95_mm", "assd_mm", "sensitivity", "specificity")


def score_case(prediction, reference, liver_only: bool = False, iou_threshold: float = 0.5) -> dict:
    """Metrics of one case: ``prediction`` and ``reference`` are label Volumes on one grid.

    With ``liver_only`` the reference is a binary liver mask (any label > 0) and tumor
    metrics and detection are left out.
    """
    pred, ref = np.asarray(prediction.array), np.asarray(reference.array)
    spacing_zyx = tuple(reversed(reference.spacing))
    result = {"liver": overlap_metrics(pred >= 1, ref >= 1, spacing_zyx)}
    if not liver_only:
        result["tumor"] = overlap_metrics(pred == 2, ref == 2, spacing_zyx)
        result["lesions"] = lesion_detection(pred == 2, ref == 2, reference, iou_threshold)
    return result


def _read_pair(case: Case, liver_only: bool):
    from LiverTumorSegLib.errors import InputError
    from LiverTumorSegLib.io import read_volume

    from .cache import check_pair

    try:
        ct, ref = read_volume(case.image), read_volume(case.label)
    except InputError as exc:
        raise DatasetError(f"case {case.case_id}: {exc}") from None
    if liver_only:
        ref = ref.with_array((np.asarray(ref.array) > 0).astype(np.uint8))
    labels = check_pair(case.case_id, ct, ref)
    return ct, ref.with_array(labels)


def check_cases(cases: List[Case], liver_only: bool = False, progress: bool = True) -> None:
    """Read every case before any is segmented, and refuse the set listing every bad case
    at once: a bad file found hours into an evaluation would lose the work before it."""
    from tqdm import tqdm

    bad = []
    for case in tqdm(cases, desc="checking", unit="case", disable=not progress):
        try:
            _read_pair(case, liver_only)
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        raise DatasetError(f"{len(bad)} of {len(cases)} case(s) cannot be evaluated; nothing was segmented:\n  "
                           + "\n  ".join(bad))


def evaluate_cases(model, cases: List[Case], out_dir: Path, *, options=None, liver_only: bool = False,
                   iou_threshold: float = 0.5, logs_dir: Optional[Path] = None, visuals: bool = True,
                   progress: bool = True) -> dict:
    """Segment and score ``cases`` with ``model`` (name, folder or LoadedModel); write the report.

    Returns the ``metrics.json`` content. Everything is written into a staging folder and
    published together once complete (``metrics.json`` last, listing every file in
    ``outputs``); the files an earlier evaluation in ``out_dir`` wrote and this one does
    not (another split's predictions and overlays) are removed then, other files kept.
    """
    from LiverTumorSegLib.atomic import StagedOutput, atomic_write_text
    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    if not cases:
        raise DatasetError("nothing to evaluate: the selected split has no labelled case")
    check_cases(cases, liver_only, progress)
    out_dir = Path(out_dir)
    segmenter = Segmenter(model, options or SegmentOptions())
    with StagedOutput(out_dir, replaces=lambda: earlier_evaluation(out_dir), last="metrics.json") as stage:
        report = _evaluate_into(stage.path, segmenter, cases, liver_only, iou_threshold, logs_dir, visuals, progress)
        outputs = sorted(f.relative_to(stage.path).as_posix() for f in stage.path.rglob("*") if f.is_file())
        report["outputs"] = sorted({*outputs, "metrics.json"})
        atomic_write_text(stage.path / "metrics.json", json.dumps(report, indent=2) + "\n")
    return report


#: A file an evaluation writes: a report, a figure, or a case's prediction; never a path
#: that leaves the folder or a hidden name, whatever a metrics.json says.
_OUTPUT_NAME = re.compile(r"(predictions/)?[A-Za-z0-9][\w.+-]*\.(json|csv|png|gif|nii\.gz)")


def earlier_evaluation(out_dir: Path) -> List[str]:
    """The files an earlier evaluation wrote into ``out_dir``, from its ``metrics.json``
    (``outputs``; for one written before that list, its cases' predictions and its
    figures); none where there is no such record (no file, a link, another program's)."""
    path = Path(out_dir) / "metrics.json"
    if path.is_symlink():
        return []
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(report, dict) and "engine_path" in report and isinstance(report.get("cases"), dict)):
            return []
        if isinstance(report.get("outputs"), list):
            names = report["outputs"]
        else:
            names = ["metrics.json", "metrics.csv", *(f"predictions/{case_id}.nii.gz" for case_id in report["cases"]),
                     *dict(report.get("figures") or {}).values()]
    except (OSError, ValueError, TypeError):
        return []
    return [name for name in names if isinstance(name, str) and _OUTPUT_NAME.fullmatch(name) and ".." not in name]


def _evaluate_into(out_dir: Path, segmenter, cases: List[Case], liver_only: bool, iou_threshold: float,
                   logs_dir: Optional[Path], visuals: bool, progress: bool) -> dict:
    from tqdm import tqdm

    from LiverTumorSegLib.atomic import atomic_write_text
    from LiverTumorSegLib.io import write_volume

    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    per_case, lesions = {}, []
    for case in tqdm(cases, desc="evaluating", unit="case", disable=not progress):
        ct, ref = _read_pair(case, liver_only)
        started = time.perf_counter()
        result = segmenter.segment(ct)
        seconds = time.perf_counter() - started
        write_volume(result.labels, out_dir / "predictions" / f"{case.case_id}.nii.gz")
        scores = score_case(result.labels, ref, liver_only, iou_threshold)
        if "lesions" in scores:
            lesions.append(scores.pop("lesions"))
            scores["lesion_counts"] = {"reference": len(lesions[-1]["reference"]),
                                       "predicted": len(lesions[-1]["predicted"]),
                                       "detected": sum(x["detected"] for x in lesions[-1]["reference"])}
        scores["seconds"] = round(seconds, 2)
        scores["image"] = str(case.image)
        scores["label"] = str(case.label)
        per_case[case.case_id] = scores
    report = {
        "model": {"name": segmenter.card.name, "version": segmenter.card.version,
                  "folder": str(segmenter.model.folder), "weights_sha256": segmenter.card.weights_sha256},
        "engine_path": "LiverTumorSegLib.io.read_volume -> LiverTumorSegLib.pipeline.Segmenter.segment "
                       "(the code path of 'livertumorseg segment')",
        "options": {k: v for k, v in vars(segmenter.options).items()},
        "resolved": {"device": str(segmenter.device),  # what "auto" became on this machine
                     "precision": segmenter.precision_name},
        "liver_only": liver_only,
        "cases": per_case,
        "mean": mean_metrics(per_case),
        "failures": {region: failed_cases(per_case, region) for region in REGIONS},
        "detection": _detection(lesions, iou_threshold),
        "definitions": {"liver": "labels 1 and 2 (whole organ)", "tumor": "label 2",
                        "hd95_mm": "max of the two directed 95th-percentile surface distances",
                        "assd_mm": "mean surface distance over both directions",
                        "empty": "Dice/IoU 1 when both masks are empty; distances undefined (null) when either is"},
    }
    atomic_write_text(out_dir / "metrics.csv", _csv(per_case))
    if visuals:
        from .plots import write_plots

        report["figures"] = write_plots(report, cases, out_dir, logs_dir, model_card=segmenter.card)
    return report


def mean_metrics(per_case: dict) -> dict:
    """``{"liver": {"dice": mean, ...}, "tumor": {...}}`` over the cases where defined,
    plus ``global_dice`` (voxels pooled over all cases, LiTS "Dice global").

    Surface distances are undefined when a mask is empty: for the worst cases (a missed
    region, or one found where the reference has none) and for cases where both are
    (no tumor, none found), so their means leave those cases out: ``hd95_mm_cases`` and
    ``assd_mm_cases`` say over how many cases they were taken; ``missed``,
    ``false_positive`` and ``both_empty`` count the cases left out
    (:func:`failed_cases` names the first two).
    """
    out = {}
    for region in REGIONS:
        rows = [case[region] for case in per_case.values() if region in case]
        if not rows:
            continue
        means = {key: mean_of([row[key] for row in rows]) for key in METRIC_KEYS}
        inter = sum(r["dice"] * (r["reference_voxels"] + r["predicted_voxels"]) / 2.0 for r in rows)
        total = sum(r["reference_voxels"] + r["predicted_voxels"] for r in rows)
        means["global_dice"] = 2.0 * inter / total if total else 1.0
        means["cases"] = len(rows)
        for key in ("hd95_mm", "assd_mm"):
            means[f"{key}_cases"] = sum(1 for row in rows if row[key] is not None)
        failed = failed_cases(per_case, region)
        means["missed"], means["false_positive"] = len(failed["missed"]), len(failed["false_positive"])
        means["both_empty"] = sum(1 for row in rows if not row["reference_voxels"] and not row["predicted_voxels"])
        out[region] = means
    return out


def failed_cases(per_case: dict, region: str) -> dict:
    """Case ids where ``region`` was missed (in the reference, not predicted) or found
    where the reference has none."""
    rows = {cid: case[region] for cid, case in per_case.items() if region in case}
    return {"missed": [cid for cid, r in rows.items() if r["reference_voxels"] and not r["predicted_voxels"]],
            "false_positive": [cid for cid, r in rows.items() if r["predicted_voxels"] and not r["reference_voxels"]]}


def _detection(lesions: list, iou_threshold: float) -> dict:
    if not lesions:
        return {"iou_threshold": iou_threshold, "overall": {}, "by_diameter": {}, "any_overlap": {}}
    main = detection_summary(lesions)
    return {"iou_threshold": iou_threshold, **main, "any_overlap": detection_summary(lesions, 0.0)}


def _csv(per_case: dict) -> str:
    columns = ["case"] + [f"{region}_{key}" for region in REGIONS for key in METRIC_KEYS] + [
        "reference_lesions", "predicted_lesions", "detected_lesions", "seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for case_id, scores in per_case.items():
        row = [case_id]
        for region in REGIONS:
            row += [_fmt(scores.get(region, {}).get(key)) for key in METRIC_KEYS]
        counts = scores.get("lesion_counts", {})
        row += [counts.get("reference", ""), counts.get("predicted", ""), counts.get("detected", ""), scores["seconds"]]
        writer.writerow(row)
    return buffer.getvalue()


def _fmt(value) -> str:
    return "" if value is None else f"{value:.6g}"
