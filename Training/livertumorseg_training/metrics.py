"""Segmentation and lesion-detection metrics, in physical units.

Masks are boolean (z, y, x) arrays on one grid; ``spacing_zyx`` is the voxel size in mm
in array order. Conventions (the LiTS ones):

* "liver" is the whole organ (labels 1 and 2), "tumor" is label 2;
* Dice and IoU are 1 when both masks are empty and 0 when exactly one is;
* HD95 is the larger of the two directed 95th-percentile surface distances and ASSD
  the mean of all surface-to-surface distances in both directions, in mm; both are
  ``None`` (undefined) when either mask is empty, both included (no surface to measure);
* a lesion is a 26-connected tumor component; a reference lesion is *detected* when
  its IoU with the predicted components that touch it reaches ``iou_threshold``
  (LiTS reports 0.5), and a predicted lesion is a true positive likewise against the
  reference lesions that touch it. Lesions are binned by their largest diameter.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

SIZE_BINS = (("<10mm", 0.0, 10.0), ("10-20mm", 10.0, 20.0), (">20mm", 20.0, float("inf")))


def _crop_box(a: np.ndarray, b: np.ndarray, margin: int = 2) -> tuple:
    union = a | b
    idx = [np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    return tuple(slice(max(int(ix[0]) - margin, 0), min(int(ix[-1]) + margin + 1, n)) for ix, n in zip(idx, a.shape))


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def surface_distances(a: np.ndarray, b: np.ndarray, spacing_zyx: Sequence[float]) -> tuple:
    """Distances (mm) from each surface voxel of ``a`` to ``b``'s surface, and back."""
    from scipy import ndimage

    box = _crop_box(a, b)
    sa, sb = _surface(a[box]), _surface(b[box])
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing_zyx)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing_zyx)
    return to_b[sa], to_a[sb]


def overlap_metrics(prediction: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """Dice, IoU, HD95 (mm), ASSD (mm), sensitivity, specificity and voxel counts of two masks."""
    p, r = np.asarray(prediction, dtype=bool), np.asarray(reference, dtype=bool)
    tp = int(np.count_nonzero(p & r))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(r)) - tp
    tn = int(p.size) - tp - fp - fn
    both_empty = tp + fp + fn == 0
    out = {
        "dice": 1.0 if both_empty else 2.0 * tp / (2 * tp + fp + fn),
        "iou": 1.0 if both_empty else tp / (tp + fp + fn),
        "sensitivity": None if tp + fn == 0 else tp / (tp + fn),
        "specificity": None if tn + fp == 0 else tn / (tn + fp),
        "hd95_mm": None, "assd_mm": None,
        "reference_voxels": tp + fn, "predicted_voxels": tp + fp,
    }
    if tp + fp > 0 and tp + fn > 0:  # undefined when either mask is empty (both: nothing to measure)
        d_pr, d_rp = surface_distances(p, r, spacing_zyx)
        out["hd95_mm"] = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        out["assd_mm"] = float((d_pr.sum() + d_rp.sum()) / max(d_pr.size + d_rp.size, 1))
    return out


def _components(mask: np.ndarray) -> tuple:
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, int(count)


def _size_bin(diameter: float) -> str:
    for name, low, high in SIZE_BINS:
        if low <= diameter < high:
            return name
    return SIZE_BINS[-1][0]


def lesion_detection(prediction: np.ndarray, reference: np.ndarray, geometry, iou_threshold: float = 0.5) -> dict:
    """Per-lesion matching of predicted and reference tumor components.

    Args:
        prediction, reference: boolean tumor masks (z, y, x).
        geometry: a :class:`~LiverTumorSegLib.volume.Volume` of that grid (for diameters).
        iou_threshold: IoU a match needs; 0 means any overlap.

    Returns:
        ``{"reference": [{diameter_mm, volume_ml, iou, detected}], "predicted":
        [{diameter_mm, volume_ml, iou, true_positive}]}``.
    """
    from LiverTumorSegLib.stats import max_diameter_mm

    ref_lab, n_ref = _components(np.asarray(reference, dtype=bool))
    pred_lab, n_pred = _components(np.asarray(prediction, dtype=bool))
    ref_sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    both = (ref_lab > 0) & (pred_lab > 0)
    pair = ref_lab[both].astype(np.int64) * (n_pred + 1) + pred_lab[both]
    inter = np.bincount(pair, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)

    def matched_iou(row: np.ndarray, own: int, sizes: np.ndarray) -> float:
        touching = np.flatnonzero(row)
        overlap = float(row[touching].sum())
        union = own + float(sizes[touching].sum()) - overlap
        return overlap / union if union > 0 else 0.0

    def hit(iou: float, touching: bool) -> bool:
        return touching and (iou >= iou_threshold if iou_threshold > 0 else True)

    from scipy import ndimage

    boxes = {"ref": ndimage.find_objects(ref_lab), "pred": ndimage.find_objects(pred_lab)}

    def describe(labels: np.ndarray, index: int, sizes: np.ndarray, kind: str) -> dict:
        box = boxes[kind][index - 1]
        sub = labels[box] == index
        offset = tuple(s.start for s in box)
        return {"diameter_mm": round(max_diameter_mm(sub, geometry, offset), 2),
                "volume_ml": round(float(sizes[index]) * geometry.voxel_volume_ml, 4)}

    refs = []
    for i in range(1, n_ref + 1):
        row = inter[i, 1:]
        iou = matched_iou(row, int(ref_sizes[i]), pred_sizes[1:])
        refs.append({**describe(ref_lab, i, ref_sizes, "ref"), "iou": round(iou, 4),
                     "detected": hit(iou, bool(row.any()))})
    preds = []
    for j in range(1, n_pred + 1):
        col = inter[1:, j]
        iou = matched_iou(col, int(pred_sizes[j]), ref_sizes[1:])
        preds.append({**describe(pred_lab, j, pred_sizes, "pred"), "iou": round(iou, 4),
                      "true_positive": hit(iou, bool(col.any()))})
    return {"reference": refs, "predicted": preds}


def detection_summary(per_case: Sequence[dict], iou_threshold: Optional[float] = None) -> dict:
    """Precision, recall and F1 pooled over cases, overall and by lesion diameter.

    ``per_case`` holds :func:`lesion_detection` results. With ``iou_threshold`` given,
    the stored IoUs are re-thresholded (``0``: any overlap counts).
    """
    def detected(lesion: dict, key: str) -> bool:
        if iou_threshold is None:
            return bool(lesion[key])
        return lesion["iou"] > 0 if iou_threshold <= 0 else lesion["iou"] >= iou_threshold

    def score(refs: list, preds: list) -> dict:
        found = sum(detected(x, "detected") for x in refs)
        correct = sum(detected(x, "true_positive") for x in preds)
        recall = found / len(refs) if refs else None
        precision = correct / len(preds) if preds else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "reference_lesions": len(refs),
                "detected": found, "predicted_lesions": len(preds), "true_positive_predictions": correct}

    refs = [x for case in per_case for x in case["reference"]]
    preds = [x for case in per_case for x in case["predicted"]]
    by_size = {name: score([x for x in refs if _size_bin(x["diameter_mm"]) == name],
                           [x for x in preds if _size_bin(x["diameter_mm"]) == name]) for name, _, _ in SIZE_BINS}
    return {"overall": score(refs, preds), "by_diameter": by_size}


def mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the defined values (``None`` when there are none)."""
    kept = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None
